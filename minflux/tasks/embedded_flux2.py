"""FLUX.2's embedded default: its small VAE and Qwen3 text encoder, made here as embedded.py makes FLUX.1's.

The flux2-small transformer is trained from scratch on the generated scenes; its frozen parts are built here and
written in the official FLUX.2 [klein] layout, then read back through the official loaders:

    run/ae.safetensors   a Flux2AutoEncoder of flux2-small's ae_params (AE_SMALL with 32 latent channels), trained
                         on the scenes by embedded.train_autoencoder; the default's ships with the package
                         (embedded_vae_flux2.safetensors), `python -m minflux.tasks.embedded_flux2 --out FILE`
                         trains it again; any other recipe trains its own, cached under OUT/cache/
    run/tokenizer/       Qwen3's tokenizer files: a byte-level BPE learned on the captions, Qwen's chat tokens
    run/text_encoder/    a Qwen3 (config.json + model.safetensors) of 28 layers, hidden size 64, frozen at its
                         random initialisation as the FLUX.1 default's CLIP and T5 are

load_qwen3 stacks hidden states 9, 18 and 27, 3 × 64 = 192 channels: flux2-small's context_in_dim. The model has
28 layers, not 27, so that state 27 is an inner layer's output, as in klein's 36-layer Qwen3, and not the output
of the final norm. Width 64 in 4 query heads of 16 sharing 2 key/value heads (Qwen3-4B's 32 of 128 sharing 8,
shrunk), and a SwiGLU of 2 × 64 = 128: each layer is 37k parameters, the whole model about 1 M.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from minflux.autoencoder import Flux2AutoEncoder
from minflux.files.load_llm import LLMEmbedder, load_qwen3
from minflux.files.tokenizers import write_qwen3_tokenizer
from minflux.qwen3 import Qwen3, Qwen3Params
from minflux.tasks.embedded import default_vae, run_captions, save_encoder, vae_command, vae_into_run
from minflux.tasks.progress import rank

PRESET = "flux2-small"  # the preset whose ae_params the shipped VAE has
# The VAE of the default recipe (TrainConfig's panel size, seed and VAE steps), as the command below trains it.
SHIPPED_VAE_FLUX2 = Path(__file__).with_name("embedded_vae_flux2.safetensors")
COMMAND = "python -m minflux.tasks.embedded_flux2"

# The small Qwen3 (vocab_size: the learned tokenizer's). rope_theta and the norms' epsilon are Qwen3-4B's.
SMALL_QWEN3 = Qwen3Params(
    vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=28, num_heads=4, num_kv_heads=2, head_dim=16,
    rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
)  # fmt: skip
QWEN3_VOCAB = 512  # at most: the generated scenes' captions and the template's words take 332 (256 bytes + merges)
# Learned beside the captions, so that each is one token, as in Qwen3's vocabulary: the chat template's two words.
TEMPLATE_WORDS = "user\nassistant"


def embedded_parts_flux2(cfg, train_set, run: Path, device) -> tuple[Flux2AutoEncoder, LLMEmbedder]:
    """(ae, text_encoder) of FLUX.2's embedded default, read through the official loaders: the small VAE trained on
    the training panels (the shipped one for the default recipe, else cached under OUT/cache/, copied into the run
    folder as ae.safetensors), and the Qwen3 with its tokenizer written into the run folder (text_encoder/,
    tokenizer/). The first process trains and writes; the others wait for it, then read."""
    ae_path = default_vae(cfg, train_set, Flux2AutoEncoder, SHIPPED_VAE_FLUX2, COMMAND)
    if rank() == 0:
        write_qwen3_encoder(run, run_captions(train_set), seed=cfg.seed)
    if dist.is_initialized():
        dist.barrier()
    ae = vae_into_run(ae_path, run)
    text_encoder = load_qwen3(run / "text_encoder", device=device, max_length=cfg.t5_max_length)
    return ae.to(device), text_encoder


def write_qwen3_encoder(folder, captions: list[str], seed: int = 0) -> None:
    """A tokenizer learned on the captions and a randomly initialised small Qwen3, in FLUX.2 [klein]'s layout under
    `folder` (tokenizer/, text_encoder/); kept if already there. Captions that are all empty (a folder without
    .txt files) still get a tokenizer: the 256 bytes and the template's words."""
    folder = Path(folder)
    if (folder / "text_encoder" / "model.safetensors").exists():
        return
    text = "\n".join([*captions, TEMPLATE_WORDS])  # with repeats: the merges follow how often words occur
    tokenizer = write_qwen3_tokenizer(folder / "tokenizer", text, vocab_size=QWEN3_VOCAB)
    vocab_size = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    params = replace(SMALL_QWEN3, vocab_size=vocab_size)
    save_encoder(init_qwen3(Qwen3(params), seed), folder / "text_encoder", qwen3_config(params))


def init_qwen3(model: Qwen3, seed: int = 0) -> Qwen3:
    """Random weights under which the stacked hidden states keep about unit size through all the layers.

    Token embeddings N(0, 1); every linear N(0, 1/fan_in), unit gain, as the FLUX.1 default's T5; the two that write
    into the residual stream (o_proj, down_proj) further scaled by 1/√(2 · layers), GPT-2's residual scaling, so that
    the 56 branches together add about the embedding's variance. Measured on captions: states 9, 18, 27 of std
    1.1, 1.1, 1.2 (without the scaling they grow to 2.9, 3.8, 4.6). The norms keep their weights of 1.
    """
    g = torch.Generator().manual_seed(seed)
    residual = (2 * model.params.num_layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0, generator=g)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(residual)
    return model.eval()


def qwen3_config(p: Qwen3Params) -> dict:
    """config.json as transformers writes a Qwen3ForCausalLM's (Qwen/Qwen3-4B's keys), read by load_qwen3 and by
    transformers. The LM head is tied to the embedding (tie_word_embeddings), so the weights hold none."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def main(argv=None) -> int:
    """python -m minflux.tasks.embedded_flux2 --out FILE: FLUX.2's default's VAE, trained as the shipped one was."""
    return vae_command(argv, COMMAND, main.__doc__, Flux2AutoEncoder, PRESET, SHIPPED_VAE_FLUX2)


if __name__ == "__main__":
    sys.exit(main())
