"""Sample from minflux.

    python sample.py                      infrared images for held-out scenes, from the latest `python train.py` run
    python sample.py --run runs/NAME      ... from that run

Writes a grid PNG [visible | semantic | generated | ground truth] and prints the held-out PSNR; the last line
printed is the output path. Text-to-image, Fill and Kontext with the official weights come with the
sampling issue; `minflux.denoise` already runs them from Python.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from minflux.data import SyntheticTriptychs, TriptychFolder, split_triptych
from minflux.flow import prepare_txt_ids
from minflux.runs import image_grid, save_png
from minflux.vis2ir import encode_triptych, generate_infrared, load_run
from minflux.weights import WeightsError


def latest_run(out: Path) -> Path | None:
    """The most recently finished run under `out` (the one whose metrics.json is newest)."""
    finished = sorted(out.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return finished[-1].parent if finished else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a train.py run folder (default: the latest under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where train.py writes its runs")
    parser.add_argument("--num", type=int, default=8, help="held-out scenes to generate")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's sample_steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--output", type=Path, default=None, help="the PNG to write (default: RUN/sample-SEED.png)")
    args = parser.parse_args(argv)

    run = args.run or latest_run(args.runs)
    if run is None:
        print(f"sample.py: no finished run under {args.runs}/; train one first with:  python train.py", file=sys.stderr)
        return 2
    start = time.perf_counter()
    parts = load_run(run)
    cfg, model, ae = parts["config"], parts["model"], parts["ae"]
    if cfg.get("data"):
        data = TriptychFolder(cfg["data"], size=cfg.get("panel_size"), on_error="skip")
        data = torch.utils.data.Subset(data, range(max(0, len(data) - args.num), len(data)))
    else:
        data = SyntheticTriptychs(args.num, cfg.get("panel_size", 64), "heldout", cfg.get("seed", 0))
    triptychs = torch.stack([data[i]["triptych"] for i in range(len(data))])  # [N, 3, 64, 192]
    prompts = [data[i]["caption"] for i in range(len(data))]
    with torch.no_grad():
        batch = encode_triptych(ae, triptychs, cfg.get("semantic", "xattn_rope"))
        y, txt = parts["clip"](prompts), parts["t5"](prompts)
        steps = args.steps or cfg.get("sample_steps", 16)
        generated = generate_infrared(
            model, ae, batch, txt, prepare_txt_ids(len(prompts), txt.shape[1]), y, steps,
            cfg.get("guidance", 1.0), seed=args.seed,
        )  # fmt: skip
    visible, truth, semantic = split_triptych(triptychs)
    mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()
    psnr = 10 * math.log10(1 / mse)
    rows = [[visible[i], semantic[i], generated[i], truth[i]] for i in range(len(data))]
    output = args.output or run / f"sample-{args.seed}.png"
    settings = {"run": str(run), "seed": args.seed, "steps": steps, "semantic": cfg.get("semantic"), "psnr": f"{psnr:.2f}"}
    save_png(image_grid(rows, captions=["visible", "semantic", "generated", "ground truth"]), output, text=settings)
    print(f"{len(data)} held-out scenes, {steps} Euler steps, {time.perf_counter() - start:.1f} s: "
          f"mse {mse:.5f}, psnr {psnr:.2f} dB")  # fmt: skip
    print(json.dumps(settings))
    print(output)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WeightsError, ValueError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        sys.exit(2)
