"""Attention maps as pictures: which text token each image region looks at, and where in the semantic map.

    python -m minflux.study.maps text                  text → image maps of the latest `python train.py` run
    python -m minflux.study.maps text --prompt "two people on the ground under the sky, infrared view"
    python -m minflux.study.maps semantic --run runs/vis2ir-xattn_rope      SemanticCrossAttention maps

Text → image (the course chapter's "observe how different prompts steer the image"). FLUX has no separate
cross-attention: text and image tokens attend jointly over [txt | img]. The image tokens' attention to the
text tokens is the [img, txt] block of every joint attention map:

    probs [B, H, T + L, T + L]  →  probs[:, :, T:, :T]  [B, H, L, T]  →  mean over heads  [B, L, T]

averaged over the chosen blocks and sampling steps, then laid out on the image's token grid, [B, T, h, w]:
one heatmap per text token, over the generated image.

SemanticCrossAttention (the vis2ir design's "attention visualisation"): for one query token of the image (a place in
the target panel), its attention over the semantic tokens, [B, 8, Lq, Ls] → mean over heads → one row
[Ls] → the semantic panel's token grid, overlaid on the semantic panel.

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

# --- recording -------------------------------------------------------------------------------------------------


class MapRecorder(AttentionMaps):
    """`with MapRecorder(flux, blocks=..., steps=...) as rec:` run the model; then `rec.text_maps()` and
    `rec.semantic_maps()`.

    flux:   the Flux transformer (or a model holding one as `.flux`, e.g. Vis2IR).
    blocks: which joint-attention blocks to average, as indices into double + single blocks (0..18 double,
            19..56 single for FLUX.1-dev); None = all.
    steps:  which model calls (sampling steps) to average, 0 = the first; None = all.
    The maps are summed as they come, so memory stays at one [B, L, T] map whatever the number of calls.
    """

    def __init__(self, flux: nn.Module, blocks=None, steps=None):
        super().__init__(reduce=self._record)
        self.model = flux
        self.flux = getattr(flux, "flux", flux)
        self.blocks = set(blocks) if blocks is not None else None
        self.steps = set(steps) if steps is not None else None
        self.step = -1  # the model call being run
        self.n_txt = 0
        self.img_ids = None  # [B, L, 3] of the first call: the token grid
        self._where: list[tuple[str, object]] = []  # the block or layer running, innermost last
        self._text = None  # sum of [B, L, T]
        self._text_calls = 0
        self._semantic: dict[str, list] = {}  # layer name → [sum of [B, Lq, Ls], calls]
        self._handles = []

    # ... hooks telling which block and which step an attention call belongs to
    def __enter__(self):
        self._handles.append(self.flux.register_forward_pre_hook(self._new_call, with_kwargs=True))
        n_double = len(self.flux.double_blocks)
        blocks = [("block", i, b) for i, b in enumerate(self.flux.double_blocks)]
        blocks += [("block", n_double + i, b) for i, b in enumerate(self.flux.single_blocks)]
        for kind, index, block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._push(kind, index)))
            self._handles.append(block.register_forward_hook(self._pop))
        for name, module in self.model.named_modules():
            if type(module).__name__ == "SemanticCrossAttention":
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
            img_to_txt = probs[:, :, self.n_txt :, : self.n_txt].float().mean(1)  # [B, H, L, T] -> [B, L, T]
            self._text = img_to_txt if self._text is None else self._text + img_to_txt
            self._text_calls += 1
        elif kind == "semantic":
            p = probs.float().mean(1)  # [B, 8, 2048, 1024] -> [B, 2048, 1024]
            entry = self._semantic.setdefault(index, [torch.zeros_like(p), 0])
            entry[0] += p
            entry[1] += 1
        return None  # nothing kept in .probs: the sums above are the record

    # ... results
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the generated image's tokens, from their ids (Kontext's reference tokens share them)."""
        ids = self.img_ids[0]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def text_maps(self) -> Tensor:
        """Image → text attention averaged over the chosen blocks and steps: [B, T, h, w]."""
        if self._text is None:
            raise ValueError("no joint attention was recorded (check --blocks and --steps against the model)")
        h, w = self.grid()
        mean = self._text / self._text_calls  # [B, L, T]
        return rearrange(mean[:, : h * w], "b (h w) t -> b t h w", h=h, w=w)  # [B, 24, 4, 8]

    def semantic_maps(self) -> dict[str, Tensor]:
        """SemanticCrossAttention probabilities per layer, averaged over steps: name → [B, Lq, Ls]."""
        return {name: total / calls for name, (total, calls) in self._semantic.items()}


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


def overlay(image: Tensor, heat: Tensor, scale: int, alpha: float = 0.6) -> Image.Image:
    """A heatmap [h, w] (any range; shown relative to its maximum) over an image [3, H, W] in [-1, 1]."""
    base = to_pil(image, scale).convert("L").convert("RGB")  # grey, so the colours read as attention only
    heat = heat.detach().float().cpu()
    heat = (heat / heat.max().clamp_min(1e-12)).numpy()
    colour = Image.fromarray(colourise(heat)).resize(base.size, Image.BILINEAR)
    return Image.blend(base, colour, alpha)


def captioned_grid(cells: list[tuple[Image.Image, str]], cols: int, pad: int = 4) -> Image.Image:
    """Equal-sized pictures in rows of `cols`, each with its caption above it."""
    w, h = cells[0][0].size
    top = 14
    rows = math.ceil(len(cells) / cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + top + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(cells):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + top + pad)
        draw.text((x, y), caption[: max(4, w // 6)], fill="black")
        grid.paste(img, (x, y + top))
    return grid


def text_map_grid(image: Tensor, maps: Tensor, tokens: list[str], cols: int = 6, scale: int = 2) -> Image.Image:
    """One heatmap per token over the image, captioned with the token; the image itself first.

    image [3, H, W] in [-1, 1]; maps [T, h, w] (the image's token grid); tokens: T strings (or fewer: the
    maps of the first len(tokens) tokens are drawn, e.g. the prompt without its padding)."""
    cells = [(to_pil(image, scale), "image")]
    for t, token in enumerate(tokens):
        mass = maps[t].mean().item() * maps.shape[0]  # 1.0 = this token gets its even share
        cells.append((overlay(image, maps[t], scale), f"{token} {mass:.2f}"))
    return captioned_grid(cells, cols)


def semantic_map_grid(
    semantic: Tensor, maps: Tensor, queries: list[tuple[int, int]], grid: tuple[int, int], cols: int = 4, scale: int = 3
) -> Image.Image:
    """For each query token (row, col) of the target panel: its attention over the semantic panel, with the
    query's own place outlined. semantic [3, S, S]; maps [Q, h·w] (one row per query); grid (h, w)."""
    h, w = grid
    cells = []
    size = semantic.shape[-1] * scale
    for (r, c), row in zip(queries, maps):
        img = overlay(semantic, row.reshape(h, w), scale)
        draw = ImageDraw.Draw(img)
        cell = size / w  # pixels per token, in the enlarged picture
        draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), outline=(0, 255, 255), width=2)
        cells.append((img, f"query ({r}, {c})"))
    return captioned_grid(cells, cols)


# --- from a finished run --------------------------------------------------------------------------------------


def t5_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's T5 pieces as text, then </s>: the text tokens that carry meaning (padding left out)."""
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
    from minflux.tasks.scenes import split_triptych

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["text", "semantic"], help="text → image, or SemanticCrossAttention maps")
    parser.add_argument("--run", type=Path, help="a train.py run folder (default: the latest under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--scene", type=int, default=0, help="the held-out scene")
    parser.add_argument("--prompt", default=None, help="text: a prompt instead of the scene's caption")
    parser.add_argument("--blocks", default=None, help="text: blocks to average, e.g. 0-1 or 2-5 (default: all)")
    parser.add_argument("--map-steps", default=None, help="sampling steps to average, e.g. 0-3 (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's)")
    parser.add_argument(
        "--query",
        default=None,
        help="semantic: one query, pixel y,x in the target panel "
        "(default: every target token, up to 16 spread over the panel)",
    )
    parser.add_argument("--output", type=Path, default=None, help="the PNG (default: RUN/maps-KIND-SCENE.png)")
    args = parser.parse_args(argv)

    run = args.run or latest_run(args.runs)
    if run is None:
        print(f"maps: no finished run under {args.runs}/; train one first with:  python train.py", file=sys.stderr)
        return 2
    out = run_maps(run, [args.scene], args.prompt, args.steps, parse_range(args.blocks), parse_range(args.map_steps))
    rec, visible = out["recorder"], split_triptych(out["triptychs"])[0][0]
    generated = out["generated"][0].float()
    output = args.output or Path(run) / f"maps-{args.kind}-{args.scene}.png"
    if args.kind == "text":
        maps = rec.text_maps()[0]  # [T, h, w] over the diptych's tokens: [visible | generated]
        image = torch.cat((visible, generated), dim=-1)  # [3, 64, 128]
        tokens = out["tokens"][0]
        picture = text_map_grid(image, maps, tokens)
        print(
            f"prompt: {out['prompts'][0]!r}, {len(tokens)} tokens; maps {list(maps.shape)} averaged over "
            f"{rec._text_calls} attention calls"
        )
    else:
        layers = rec.semantic_maps()
        if not layers:
            print(
                f"maps: {run} has no SemanticCrossAttention (its --semantic is {out['config'].semantic!r}); "
                "train one with:  python train.py --semantic xattn_rope",
                file=sys.stderr,
            )
            return 2
        probs = torch.stack(list(layers.values())).mean(0)  # over the layers (blocks: one a block): [1, Lq, Ls]
        h, w2 = rec.grid()  # query grid: the diptych's tokens, h × 2w
        w = w2 // 2
        semantic = split_triptych(out["triptychs"])[2][0]
        if args.query:
            y, x = (int(v) for v in args.query.split(","))
            queries = [(y * h // semantic.shape[-2], x * w // semantic.shape[-1])]
        else:
            every = [(r, c) for r in range(h) for c in range(w)]
            queries = every if len(every) <= 16 else [(r * h // 4, c * w // 4) for r in range(4) for c in range(4)]
        rows = torch.stack([probs[0, r * w2 + w + c] for r, c in queries])  # target-half queries → [Q, h·w]
        picture = semantic_map_grid(semantic, rows, queries, (h, w))
        print(
            f"{len(layers)} SemanticCrossAttention layer(s) ({', '.join(layers)}): queries {len(queries)} of the "
            f"target panel, maps {list(probs.shape)}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(output)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
