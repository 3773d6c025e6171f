"""Course exercises on minflux (the cross-attention chapter's homework, the FLUX walk-through): the experiments
that need code.

    python -m minflux.study.exercises cross-attention      write cross-attention by hand, check Q/K/V shapes
    python -m minflux.study.exercises clip-similarity      cosine similarity of CLIP encodings of prompts
    python -m minflux.study.exercises class-label          the thought question: class label vs cross-attention
    python -m minflux.study.exercises check FILE.py        your own layer against minflux's (study/check.py)

minflux/study/EXERCISES.md lists every exercise: what to read, what to run, what to observe.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# --- 1. cross-attention by hand (the chapter's 20.3) ----------------------------------------------------------------


class CrossAttention(nn.Module):
    """The chapter's layer: queries from the image features, keys and values from the context (text, or a map).

    Written out, as the course asks; minflux/semantic.py's SemanticCrossAttention is the same layer with
    LayerNorms, a zero-initialised scale and optional RoPE.
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, query_dim)
        self.to_k = nn.Linear(context_dim, query_dim)
        self.to_v = nn.Linear(context_dim, query_dim)
        self.to_out = nn.Linear(query_dim, query_dim)
        self.shapes: dict[str, list[int]] = {}  # the last call's shapes, for the exercise

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # x [B, 64, 512] image features; context [B, 77, 768] text features
        q = rearrange(self.to_q(x), "B L (H D) -> B H L D", H=self.num_heads)  # [B, 8, 64, 64]
        k = rearrange(self.to_k(context), "B S (H D) -> B H S D", H=self.num_heads)  # [B, 8, 77, 64]
        v = rearrange(self.to_v(context), "B S (H D) -> B H S D", H=self.num_heads)  # [B, 8, 77, 64]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, 8, 64, 77]
        weights = scores.softmax(dim=-1)  # each image position's distribution over the 77 text tokens
        out = rearrange(weights @ v, "B H L D -> B L (H D)")  # [B, 64, 512]
        self.shapes = {
            "Q": list(q.shape),
            "K": list(k.shape),
            "V": list(v.shape),
            "weights": list(weights.shape),
            "out": list(out.shape),
        }
        return self.to_out(out)


def cross_attention_exercise() -> dict:
    """The chapter's test: image features [2, 64, 512] attend to text features [2, 77, 768]. Prints the shapes
    and checks the hand-written softmax(QKᵀ/√d)V against PyTorch's fused kernel on the same projections."""
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=512, context_dim=768, num_heads=8)
    image, text = torch.randn(2, 64, 512), torch.randn(2, 77, 768)
    out = layer(image, text)
    q = rearrange(layer.to_q(image), "B L (H D) -> B H L D", H=8)
    k = rearrange(layer.to_k(text), "B S (H D) -> B H S D", H=8)
    v = rearrange(layer.to_v(text), "B S (H D) -> B H S D", H=8)
    fused = layer.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "B H L D -> B L (H D)"))
    err = (out - fused).abs().max().item()
    for name, shape in {"image features": list(image.shape), "text features": list(text.shape), **layer.shapes}.items():
        print(f"{name:>15}: {shape}")
    print(f"max |hand-written − fused SDPA| = {err:.2e}")
    return {**layer.shapes, "max_abs_diff": err}


# --- 2. CLIP encodings compared ----------------------------------------------------------------------------------

DEFAULT_PROMPTS = [
    "a tree on the ground under the sky, infrared view",
    "two trees on the ground under the sky, infrared view",
    "a person on the ground under the sky, infrared view",
    "a building and a vehicle on the ground under the sky, infrared view",
]


def clip_similarity(prompts: list[str], clip_path=None) -> Tensor:
    """Cosine similarity of the pooled CLIP vectors [N, 768] of the prompts: an [N, N] matrix.

    clip_path: a text_encoder/ folder (the official CLIP-L, or a run's). None: the latest run's, or else the
    embedded default's small CLIP, built in runs/cache/exercise-text (seconds)."""
    from minflux.files.load import load_clip

    if clip_path is None:
        runs = sorted(Path("runs").glob("*/text_encoder/config.json"), key=lambda p: p.stat().st_mtime)
        if runs:
            clip_path = runs[-1].parent
        else:
            from minflux.tasks.embedded import write_text_encoders
            from minflux.tasks.scenes import SyntheticTriptychs

            folder = Path("runs/cache/exercise-text")
            write_text_encoders(folder, SyntheticTriptychs(2000).captions())
            clip_path = folder / "text_encoder"
    clip = load_clip(clip_path)
    pooled = clip(prompts)  # [N, 768]
    unit = F.normalize(pooled.float(), dim=-1)
    sim = unit @ unit.T  # [N, N]
    print(f"CLIP: {clip_path} (pooled {list(pooled.shape)})")
    for i, p in enumerate(prompts):
        print(f"  [{i}] {p}")
    print("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(prompts))))
    for i in range(len(prompts)):
        print(f"  [{i}] " + "".join(f"{sim[i, j].item():8.3f}" for j in range(len(prompts))))
    return sim


# --- 3. the thought question: a class label instead of cross-attention ---------------------------------------------

CONDITIONS = ("none", "class label", "cross-attention", "cross-attention + positions")


class TinyTranslator(nn.Module):
    """Visible panel → infrared panel, on 4×4-pixel patches: a two-block transformer, conditioned four ways.

    none:                         the visible panel alone
    class label:                  a label vector (how many objects of each class the scene holds, as the
                                  caption says) embedded and added to every token: how a class-conditional
                                  diffusion model takes its label (added to the time embedding)
    cross-attention:              after each block, every image token attends to the semantic panel's patch
                                  tokens (the chapter's layer), which carry no positions: a set, as text is
    cross-attention + positions:  the same, with the image's position embedding added to the semantic tokens
    """

    def __init__(self, condition: str, size: int = 32, patch: int = 4, dim: int = 64, classes: int = 4):
        super().__init__()
        self.condition, self.patch = condition, patch
        n = (size // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, n, dim))  # learned; std 1: positions tell tokens apart from the start
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0, batch_first=True, norm_first=True) for _ in range(2)
        )
        if condition == "class label":
            self.label = nn.Sequential(nn.Linear(classes, dim), nn.SiLU(), nn.Linear(dim, dim))
        if condition.startswith("cross-attention"):
            self.semantic = nn.Linear(3 * patch * patch, dim)
            self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.blocks)
            self.cross = nn.ModuleList(CrossAttention(dim, dim, num_heads=4) for _ in self.blocks)
        self.out = nn.Linear(dim, patch * patch)

    def forward(self, visible: Tensor, semantic: Tensor, label: Tensor) -> Tensor:
        p = self.patch
        x = self.embed(rearrange(visible, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)) + self.pos  # [B, 64, 64]
        if self.condition == "class label":
            x = x + self.label(label)[:, None]  # one vector for the whole image
        if self.condition.startswith("cross-attention"):
            context = self.semantic(rearrange(semantic, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p))  # [B, 64, 64]
            if self.condition.endswith("positions"):
                context = context + self.pos
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.condition.startswith("cross-attention"):
                x = x + self.cross[i](self.norms[i](x), context)
        h = visible.shape[-2] // p
        return rearrange(self.out(x), "b (h w) (p q) -> b 1 (h p) (w q)", h=h, p=p, q=p)  # [B, 1, 32, 32]


def scene_tensors(n: int, split: str, size: int, seed: int = 0) -> dict[str, Tensor]:
    """visible [N, 3, S, S], semantic [N, 3, S, S], infrared [N, 1, S, S] in [0, 1]; label [N, 4] (object
    counts per class / 4); objects [N, S, S] bool (the pixels of objects, where the class matters)."""
    import numpy as np

    from minflux.tasks.scenes import OBJECT_CLASSES, make_scene

    scenes = [make_scene(np.random.default_rng([seed, 7 + (split == "heldout"), i]), size) for i in range(n)]
    t = lambda key: torch.from_numpy(np.stack([getattr(s, key) for s in scenes]))  # noqa: E731
    label = torch.tensor([[sum(o.cls == c for o in s.objects) / 4 for c in OBJECT_CLASSES] for s in scenes])
    return {
        "visible": rearrange(t("visible"), "n h w c -> n c h w"),
        "semantic": rearrange(t("semantic"), "n h w c -> n c h w"),
        "infrared": rearrange(t("infrared"), "n h w c -> n c h w")[:, :1],
        "label": label.float(),
        "objects": t("instances") > 0,
    }


def class_label_experiment(
    steps: int = 1500, train: int = 4000, heldout: int = 256, size: int = 32, batch: int = 32, seed: int = 0, log=print
) -> dict[str, dict[str, float]]:
    """Train TinyTranslator under each condition on the same data and steps; held-out MSE (pixel units in
    [0, 1]) over the whole panel and over the objects alone. Returns {condition: {"mse", "objects_mse"}}."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and a busy machine hurts it least)
    try:
        return _class_label_runs(steps, train, heldout, size, batch, seed, log, start)
    finally:
        torch.set_num_threads(threads)


def _class_label_runs(steps, train, heldout, size, batch, seed, log, start):
    data, held = scene_tensors(train, "train", size, seed), scene_tensors(heldout, "heldout", size, seed)
    results = {}
    for condition in CONDITIONS:
        torch.manual_seed(seed)
        model = TinyTranslator(condition, size)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for group in opt.param_groups:  # cosine decay
                group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(train, (batch,), generator=g)
            pred = model(data["visible"][idx], data["semantic"][idx], data["label"][idx])
            loss = F.mse_loss(pred, data["infrared"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            err = (model(held["visible"], held["semantic"], held["label"]) - held["infrared"]).pow(2)[:, 0]  # [N, S, S]
        results[condition] = {"mse": err.mean().item(), "objects_mse": err[held["objects"]].mean().item()}
        log(
            f"{condition:<28} held-out MSE {results[condition]['mse']:.5f}, on objects "
            f"{results[condition]['objects_mse']:.5f}   ({time.perf_counter() - start:.0f} s)"
        )
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # check FILE.py [--what ...]: its own flags and --help
        from minflux.study.check import main as check

        return check(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=["cross-attention", "clip-similarity", "class-label"])
    parser.add_argument("prompts", nargs="*", help="clip-similarity: the prompts to compare (default: four captions)")
    parser.add_argument("--clip", default=None, help="clip-similarity: a text_encoder/ folder (default: latest run's)")
    parser.add_argument("--steps", type=int, default=1500, help="class-label: training steps per model")
    parser.add_argument("--train", type=int, default=4000, help="class-label: training scenes")
    parser.add_argument("--heldout", type=int, default=256, help="class-label: held-out scenes")
    args = parser.parse_args(argv)
    if args.name == "cross-attention":
        cross_attention_exercise()
    elif args.name == "clip-similarity":
        clip_similarity(args.prompts or DEFAULT_PROMPTS, args.clip)
    else:
        print(
            f"class label vs cross-attention: {len(CONDITIONS)} models, {args.steps} steps each, "
            f"{args.train} scenes of 32 px"
        )
        results = class_label_experiment(args.steps, args.train, args.heldout)
        none = results["none"]["objects_mse"]
        print("\non the objects, relative to no condition:")
        for c, r in results.items():
            print(f"  {c:<28} {none / r['objects_mse']:.2f}× lower error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
