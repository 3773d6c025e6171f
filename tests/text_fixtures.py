"""Small text-encoder fixtures for the tests: a tiny CLIP tokenizer folder, in the official file format.

The official CLIP vocabulary (49408 entries) is: the 256 byte symbols, the same 256 with "</w>" (end of word),
one entry per BPE merge, then <|startoftext|> and <|endoftext|>. `write_clip_tokenizer` writes a folder in
that format with a few hundred merges learned here on a small corpus, so tokenizer tests need no download.
"""

from pathlib import Path

from minflux.files.tokenizers import EOS, write_clip_tokenizer as _write

TRAINING_TEXT = """
a photo of a cat sitting on a red chair, highly detailed, studio lighting, 4k
a painting of the eiffel tower at night in the style of van gogh, starry sky
portrait of an old man with a beard, black and white photograph, film grain
café crème brûlée on a table in paris, naïve façade, señor piñata, über straße
東京タワーの夜景 富士山と桜 日本の伝統的な庭園 北京烤鸭 上海的夜景
a happy dog 🐶 playing in the park 🌳 with a ball ⚽ under the sun ☀️ 🎉🎉
it's a dog's life, we're here, they've gone, i'm sure, you'll see, he'd say
transform the input photo of a person wearing clothes into a professional flat lay product shot
"""


def write_clip_tokenizer(folder, num_merges: int = 300, pad_token: str = EOS, configs: bool = True) -> Path:
    """The tests' CLIP tokenizer folder: merges learned on TRAINING_TEXT."""
    return _write(folder, TRAINING_TEXT, num_merges=num_merges, pad_token=pad_token, configs=configs)
