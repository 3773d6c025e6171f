"""Attention maps as pictures: which text token each image region looks at, and where in the semantic map.

    python -m minflux.study.maps text                  text → image maps of the latest `python train.py` run
    python -m minflux.study.maps text --prompt "two people on the ground under the sky, infrared view"
    python -m minflux.study.maps semantic --run runs/vis2ir-xattn_rope      SemanticCrossAttention maps

Text → image (the course chapter's "observe how different prompts steer the image"). FLUX has no separate
cross-attention: text and image tokens attend jointly over [txt | img]. The image tokens' attention to the
text tokens is the [img, txt] block of every joint attention map:

    probs [B, H, T + L, T + L]  →  probs[:, :, T:, :T]  [B, H, L, T]  →  mean over heads  [B, L, T]

averaged over the chosen blocks and sampling steps, then laid out on the image's token grid, [B, T, h, w]:
one heatmap per text token, over the generated image. Each is captioned with the token's part of the attention
that goes to text (1.00 = an even share, 1/T); the title says what part goes to text at all (the rest goes to
image tokens: about half) and how much the padding tokens, which are not drawn, take.

SemanticCrossAttention (the vis2ir design's "attention visualisation"): for one query token of the image (a place in
the target panel), its attention over the semantic tokens, [B, 8, Lq, Ls] → mean over heads → one row
[Ls] → the semantic panel's token grid, overlaid on the semantic panel in its classes' colours.

Without --output a picture never replaces another: RUN/maps-text-0.png, then maps-text-0-2.png, ...

Both are recorded with `minflux.attention.AttentionMaps`, which switches to the explicit softmax(QKᵀ/√d)·V
path while it records; outside it the fused path runs untouched. Block and step are told apart by forward
hooks on the model, so the model's code needs no change.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch import Tensor, nn

from minflux.attention import AttentionMaps
from minflux.files.images import save_new, save_png

# --- recording -------------------------------------------------------------------------------------------------


class MapRecorder(AttentionMaps):
    """`with MapRecorder(flux, blocks=..., steps=...) as rec:` run the model; then `rec.text_maps()` and
    `rec.semantic_maps()`.

    flux:   the Flux transformer (or a model holding one as `.flux`, e.g. Vis2IR).
    blocks: which joint-attention blocks to average, as indices into double + single blocks (0..18 double,
            19..56 single for FLUX.1-dev); None = all.
    steps:  which model calls (Euler steps) to average, 0 = the first; None = all. A call is counted when the
            model given here starts, so a wrapper's layers that run before the transformer (Vis2IR's adapter)
            belong to the step they run in.
    The maps are summed as they come, so memory stays at one [B, L, T] map whatever the number of calls.
    """

    def __init__(self, flux: nn.Module, blocks=None, steps=None):
        super().__init__(reduce=self._record)
        self.model = flux
        self.flux = getattr(flux, "flux", flux)
        self.blocks = set(blocks) if blocks is not None else None
        self.steps = set(steps) if steps is not None else None
        self.step = -1  # the model call being run: 0 = the first Euler step
        self.n_txt = 0
        self.n_double, self.n_blocks, self.layers = 0, 0, []  # what the model holds (set on entering)
        self.recorded_steps: set[int] = set()
        self.img_ids = None  # [B, L, 3] of the first call: the token grid
        self._where: list[tuple[str, object]] = []  # the block or layer running, innermost last
        self._text = None  # sum of [B, L, T]
        self._text_calls = 0
        self._text_share = None  # sum of [B, L]: each image token's attention on the text keys, of all its keys
        self._semantic: dict[str, list] = {}  # layer name → [sum of [B, Lq, Ls], calls]
        self._handles = []

    # ... hooks telling which block and which step an attention call belongs to
    def __enter__(self):
        # the outer model's call, not the transformer's: Vis2IR's adapter runs before its transformer is called
        self._handles.append(self.model.register_forward_pre_hook(self._new_call, with_kwargs=True))
        self.n_double = len(self.flux.double_blocks)
        blocks = [("block", i, b) for i, b in enumerate(self.flux.double_blocks)]
        blocks += [("block", self.n_double + i, b) for i, b in enumerate(self.flux.single_blocks)]
        self.n_blocks = len(blocks)
        for kind, index, block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._push(kind, index)))
            self._handles.append(block.register_forward_hook(self._pop))
        for name, module in self.model.named_modules():
            if type(module).__name__ == "SemanticCrossAttention":
                self.layers.append(name)
                self._handles.append(module.register_forward_pre_hook(self._push("semantic", name)))
                self._handles.append(module.register_forward_hook(self._pop))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*exc)

    def _new_call(self, module, args, kwargs):
        names = ["img", "img_ids", "txt"]
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        self.step += 1
        self.n_txt = given["txt"].shape[1]
        if self.img_ids is None:
            self.img_ids = given["img_ids"].detach().cpu()

    def _push(self, kind, index):
        def hook(module, args):
            self._where.append((kind, index))

        return hook

    def _pop(self, module, args, output):
        self._where.pop()

    def _record(self, probs: Tensor):
        if not self._where or (self.steps is not None and self.step not in self.steps):
            return None
        kind, index = self._where[-1]
        if kind == "block" and (self.blocks is None or index in self.blocks):
            rows = probs[:, :, self.n_txt :].float()  # the image tokens' queries: [B, H, L, T + L]
            img_to_txt = rows[..., : self.n_txt].mean(1)  # [B, H, L, T] -> [B, L, T]
            share = img_to_txt.sum(-1) / rows.sum(-1).mean(1)  # text keys of all keys: [B, L]
            self._text = img_to_txt if self._text is None else self._text + img_to_txt
            self._text_share = share if self._text_share is None else self._text_share + share
            self._text_calls += 1
            self.recorded_steps.add(self.step)
        elif kind == "semantic":
            p = probs.float().mean(1)  # [B, 8, 2048, 1024] -> [B, 2048, 1024]
            entry = self._semantic.setdefault(index, [torch.zeros_like(p), 0])
            entry[0] += p
            entry[1] += 1
            self.recorded_steps.add(self.step)
        return None  # nothing kept in .probs: the sums above are the record

    # ... results
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the generated image's tokens, from their ids (Kontext's reference tokens share them)."""
        ids = self.img_ids[0]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def text_maps(self) -> Tensor:
        """Image → text attention averaged over the chosen blocks and steps: [B, T, h, w]."""
        if self._text is None:
            raise ValueError(self.nothing_recorded("joint attention"))
        h, w = self.grid()
        mean = self._text / self._text_calls  # [B, L, T]
        return rearrange(mean[:, : h * w], "b (h w) t -> b t h w", h=h, w=w)  # [B, 24, 4, 8]

    def text_share(self) -> Tensor:
        """[B]: the part of the image tokens' attention that went to the text tokens (the rest went to image
        tokens), averaged over the image's tokens and the chosen blocks and steps."""
        if self._text_share is None:
            raise ValueError(self.nothing_recorded("joint attention"))
        h, w = self.grid()
        return (self._text_share / self._text_calls)[:, : h * w].mean(1)

    def semantic_maps(self) -> dict[str, Tensor]:
        """SemanticCrossAttention probabilities per layer, averaged over steps: name → [B, Lq, Ls]; {} for a
        model without the layer, ValueError when it has one but the chosen steps recorded no call of it."""
        if self.layers and not self._semantic:
            raise ValueError(self.nothing_recorded("SemanticCrossAttention"))
        return {name: total / calls for name, (total, calls) in self._semantic.items()}

    def nothing_recorded(self, what: str) -> str:
        """Why the chosen steps and blocks recorded no call of `what`: the ones asked for against those that ran."""
        ran = set(range(self.step + 1))
        problems = []
        if self.steps is not None and not self.steps & ran:
            problems.append(
                f"--map-steps {ranges(self.steps)}: the run made {self.step + 1} model call(s), "
                f"steps {ranges(ran) or 'none'} (0 = the first Euler step)"
            )
        if what == "joint attention" and self.blocks is not None and not self.blocks & set(range(self.n_blocks)):
            problems.append(
                f"--blocks {ranges(self.blocks)}: the model has blocks 0-{self.n_blocks - 1} "
                f"(0-{self.n_double - 1} double, {self.n_double}-{self.n_blocks - 1} single)"
            )
        return f"the selection recorded no {what} call: " + ("; ".join(problems) or "nothing ran")


def ranges(indices) -> str:
    """{0, 1, 2, 3, 7} → "0-3,7" (parse_range's inverse)."""
    out = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out)


# --- pictures -----------------------------------------------------------------------------------------------

# A perceptual dark-to-bright colour ramp (after matplotlib's "inferno"): black, purple, red, orange, yellow.
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colourise(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1], [h, w] → RGB [h, w, 3] uint8 along RAMP."""
    pos = np.clip(x, 0, 1) * (len(RAMP) - 1)
    i = np.minimum(pos.astype(int), len(RAMP) - 2)
    f = (pos - i)[..., None]
    return ((1 - f) * RAMP[i] + f * RAMP[i + 1]).astype(np.uint8)


def to_pil(image: Tensor, scale: int) -> Image.Image:
    """[3, H, W] in [-1, 1] → PIL image, enlarged `scale` times (nearest: the pixels stay visible)."""
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pil = Image.fromarray(rearrange(x, "c h w -> h w c").cpu().numpy())
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def overlay(image: Tensor, heat: Tensor, scale: int, alpha: float = 0.6, grey: bool = True) -> Image.Image:
    """A heatmap [h, w] (any range; shown relative to its maximum) over an image [3, H, W] in [-1, 1], made grey
    first (so the colours read as attention only) unless its colours carry meaning (a semantic map's classes)."""
    base = to_pil(image, scale)
    base = base.convert("L").convert("RGB") if grey else base
    heat = heat.detach().float().cpu()
    heat = (heat / heat.max().clamp_min(1e-12)).numpy()
    colour = Image.fromarray(colourise(heat)).resize(base.size, Image.BILINEAR)
    return Image.blend(base, colour, alpha)


def captioned_grid(cells: list[tuple[Image.Image, str]], cols: int, pad: int = 4, title=()) -> Image.Image:
    """Equal-sized pictures in rows of `cols`, each with its caption above it; the lines of `title` above all."""
    w, h = cells[0][0].size
    top, head = 14, 14 * len(title)
    rows = math.ceil(len(cells) / cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, head + rows * (h + top + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title):
        draw.text((pad, pad + 14 * i), line, fill="black")
    for i, (img, caption) in enumerate(cells):
        x, y = pad + (i % cols) * (w + pad), head + pad + (i // cols) * (h + top + pad)
        draw.text((x, y), caption[: max(4, w // 6)], fill="black")
        grid.paste(img, (x, y + top))
    return grid


def text_shares(maps: Tensor) -> Tensor:
    """[T]: each text token's part of the attention the image gives to text, times T: 1.00 = an even share."""
    per_token = maps.flatten(1).mean(1)  # [T, h, w] -> [T]: of all the attention, averaged over the image
    return per_token / per_token.sum() * maps.shape[0]


def text_legend(maps: Tensor, n_shown: int, text_share: float) -> list[str]:
    """What the numbers of text_map_grid mean, and what they leave out: the attention on image tokens and on the
    padding. maps [T, h, w]; n_shown: the tokens drawn (the prompt's), the rest being padding."""
    T, shares = maps.shape[0], text_shares(maps)
    padding = shares[n_shown:].sum().item() / T
    return [
        f"numbers: a token's part of the image's attention to text; 1.00 = an even share (1/{T} of it); "
        "each heatmap relative to its own maximum",
        f"the image tokens' attention: {text_share:.0%} to the {T} text tokens, {1 - text_share:.0%} to image "
        f"tokens; {T - n_shown} padding token(s) not shown ({padding:.0%} of the part on text)",
    ]


def text_map_grid(
    image: Tensor, maps: Tensor, tokens: list[str], cols: int = 6, scale: int = 2, title=(), beside=None
) -> Image.Image:
    """One heatmap per token over the image, captioned with the token and its text_shares number; the image
    itself first, the lines of `title` above (text_legend).

    image [3, H, W] in [-1, 1]; maps [T, h, w] (the image's token grid); tokens: T strings (or fewer: the
    maps of the first len(tokens) tokens are drawn, e.g. the prompt without its padding). beside [3, H, W']: a
    picture drawn untouched to the right of every cell (vis2ir: the semantic panel in its classes' colours, to
    compare where a word looks with where its class is)."""
    shares = text_shares(maps)  # [T]
    cells = [(to_pil(image, scale), "image")]
    cells += [(overlay(image, maps[t], scale), f"{token} {shares[t].item():.2f}") for t, token in enumerate(tokens)]
    if beside is not None:
        cells = [(side_by_side(cell, to_pil(beside, scale)), caption) for cell, caption in cells]
    return captioned_grid(cells, cols, title=title)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two pictures of one height in one, a white line of 2 pixels between them."""
    out = Image.new("RGB", (left.width + 2 + right.width, left.height), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + 2, 0))
    return out


def semantic_map_grid(
    semantic: Tensor, maps: Tensor, queries: list[tuple[int, int]], grid: tuple[int, int], cols: int = 4, scale: int = 3
) -> Image.Image:
    """For each query token (row, col) of the target panel: its attention over the semantic panel, with the
    query's own place outlined. semantic [3, S, S]; maps [Q, h·w] (one row per query); grid (h, w)."""
    h, w = grid
    cells = []
    size = semantic.shape[-1] * scale
    for (r, c), row in zip(queries, maps):
        img = overlay(semantic, row.reshape(h, w), scale, grey=False)  # in the classes' colours
        draw = ImageDraw.Draw(img)
        cell = size / w  # pixels per token, in the enlarged picture
        draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), outline=(0, 255, 255), width=2)
        cells.append((img, f"query ({r}, {c})"))
    return captioned_grid(cells, cols)


# --- from a finished run --------------------------------------------------------------------------------------


def t5_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's T5 pieces as text, then </s>: the text tokens that carry meaning (padding left out). FLUX.2's
    chat tokenizer: every token of the prompt in its chat template (Qwen3 pads on the right, so they come first)."""
    if hasattr(tokenizer, "chat"):
        encoding = tokenizer.backend.encode(tokenizer.chat(prompt), add_special_tokens=tokenizer.add_special_tokens)
        return [t.replace("Ġ", "_").replace("Ċ", "\\n") for t in encoding.tokens[: tokenizer.max_length]]
    ids = tokenizer.encode(prompt)[: tokenizer.max_length - 1]
    backend = tokenizer.backend
    piece = backend.id_to_token if hasattr(backend, "id_to_token") else backend.id_to_piece
    return [piece(i).replace("▁", "_") for i in ids] + ["</s>"]


def run_maps(
    run,
    scenes: list[int],
    prompt: str | None = None,
    steps: int | None = None,
    blocks=None,
    map_steps=None,
    seed: int = 0,
) -> dict:
    """Generate the infrared panels of held-out scenes of a run while recording the attention maps.

    Returns dict(recorder, generated [N, 3, S, S], triptychs [N, 3, S, 3S], prompts, tokens, config)."""
    from minflux.tasks.data import triptychs
    from minflux.pipeline import load_run
    from minflux.tasks.vis2ir import datasets, generate_infrared, in_context_of, prepare_for_run

    parts = load_run(run)
    cfg, model, ae = parts.run.config, parts.model, parts.ae
    _, held = datasets(cfg, heldout=max(scenes) + 1)
    trip = triptychs(held, scenes)  # [N, 3, 64, 192]
    prompts = [prompt or held[i]["caption"] for i in scenes]
    with torch.no_grad():
        inp = prepare_for_run(cfg, parts.t5, parts.clip, ae, trip, prompts, seed, trip.dtype)
        with MapRecorder(model, blocks=blocks, steps=map_steps) as recorder:
            generated = generate_infrared(model, ae, inp, steps or cfg.sample_steps, cfg.guidance, in_context_of(cfg))
    tokens = [t5_tokens(parts.t5.tokenizer, p) for p in prompts]
    return dict(recorder=recorder, generated=generated, triptychs=trip, prompts=prompts, tokens=tokens, config=cfg)


def parse_range(text: str | None) -> list[int] | None:
    """ "0-3,7" → [0, 1, 2, 3, 7]; None → None (all)."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(argv=None) -> int:
    from minflux.tasks.folders import latest_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["text", "semantic"], help="text → image, or SemanticCrossAttention maps")
    parser.add_argument("--run", type=Path, help="a train.py run folder (default: the latest under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--scene", type=int, default=0, help="the held-out scene")
    parser.add_argument("--prompt", default=None, help="text: a prompt instead of the scene's caption")
    parser.add_argument("--blocks", default=None, help="text: blocks to average, e.g. 0-1 or 2-5 (default: all)")
    parser.add_argument(
        "--map-steps", default=None, help="Euler steps to average, 0 = the first, e.g. 0-3 (default: all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's)")
    parser.add_argument(
        "--query",
        default=None,
        help="semantic: one query, pixel y,x in the target panel "
        "(default: every target token, up to 16 spread over the panel)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the PNG, replaced if there (default: RUN/maps-KIND-SCENE.png, or -2, -3, ... after it: never replaced)",
    )
    args = parser.parse_args(argv)

    run = args.run or latest_run(args.runs)
    if run is None:
        print(f"maps: no finished run under {args.runs}/; train one first with:  python train.py", file=sys.stderr)
        return 2
    out = run_maps(run, [args.scene], args.prompt, args.steps, parse_range(args.blocks), parse_range(args.map_steps))
    try:
        picture = text_picture(out) if args.kind == "text" else semantic_picture(out, run, args.query)
    except ValueError as e:  # the run has no such layer, or the chosen --map-steps / --blocks recorded no call
        print(f"maps: {e}", file=sys.stderr)
        return 2
    print(save_map(picture, args.output or Path(run) / f"maps-{args.kind}-{args.scene}.png", args.output is None))
    return 0


def text_picture(out: dict) -> Image.Image:
    """`maps text`: the grid of run_maps' first scene, its legend printed and drawn above it; the semantic panel
    beside every cell."""
    from minflux.tasks.scenes import split_triptych
    from minflux.tasks.vis2ir import in_context_of

    rec, tokens = out["recorder"], out["tokens"][0]
    panels = split_triptych(out["triptychs"])  # visible, infrared, semantic map: [B, 3, S, S] each
    visible, generated, semantic = panels[0][0], out["generated"][0].float(), panels[2][0]
    maps = rec.text_maps()[0]  # [T, h, w] over the image being made
    legend = text_legend(maps, len(tokens), rec.text_share()[0].item())
    if in_context_of(out["config"]) == "fill":  # the image being made is the diptych [visible | generated]
        image, beside = torch.cat((visible, generated), dim=-1), semantic  # [3, 64, 128]; cells [3, 64, 192]
    else:  # Kontext: the generated panel; the visible one is a reference, whose tokens' maps are not drawn
        image, beside = generated, torch.cat((visible, semantic), dim=-1)  # [3, 64, 64]; cells [3, 64, 192]
        legend.append("Kontext: the maps of the generated panel's tokens; beside it the reference and the map")
    print(
        f"prompt: {out['prompts'][0]!r}, {len(tokens)} tokens; maps {list(maps.shape)} averaged over "
        f"{rec._text_calls} attention calls (steps {ranges(rec.recorded_steps)})\n" + "\n".join(legend)
    )
    return text_map_grid(image, maps, tokens, cols=4, title=legend, beside=beside)


def semantic_picture(out: dict, run, query: str | None) -> Image.Image:
    """`maps semantic`: the grid of run_maps' first scene, for one query place "y,x" or up to 16 spread over it."""
    from minflux.tasks.scenes import split_triptych

    rec = out["recorder"]
    if not rec.layers:
        raise ValueError(
            f"{run} has no SemanticCrossAttention (its --semantic is {out['config'].semantic!r}); "
            "train one with:  python train.py --semantic xattn_rope"
        )
    layers = rec.semantic_maps()
    probs = torch.stack(list(layers.values())).mean(0)  # over the layers (blocks: one a block): [1, Lq, Ls]
    h, w2 = rec.grid()  # query grid: the diptych's tokens, h × 2w
    w = w2 // 2
    semantic = split_triptych(out["triptychs"])[2][0]
    if query:
        y, x = (int(v) for v in query.split(","))
        queries = [(y * h // semantic.shape[-2], x * w // semantic.shape[-1])]
    else:
        every = [(r, c) for r in range(h) for c in range(w)]
        queries = every if len(every) <= 16 else [(r * h // 4, c * w // 4) for r in range(4) for c in range(4)]
    rows = torch.stack([probs[0, r * w2 + w + c] for r, c in queries])  # target-half queries → [Q, h·w]
    print(
        f"{len(layers)} SemanticCrossAttention layer(s) ({', '.join(layers)}): queries {len(queries)} of the "
        f"target panel, maps {list(probs.shape)} averaged over steps {ranges(rec.recorded_steps)}"
    )
    return semantic_map_grid(semantic, rows, queries, (h, w))


def save_map(picture: Image.Image, path: Path, new: bool) -> Path:
    """The picture as a PNG at `path`, replacing a file there; with `new`, never: when `path` is taken, its stem +
    -2, -3, ..., each name taken exclusively (two runs at once never take the same one)."""
    return save_new(picture, path) if new else save_png(picture, path)


if __name__ == "__main__":
    sys.exit(main())
