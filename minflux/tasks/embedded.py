"""The embedded default: every FLUX component, small, built and trained here on a CPU.

Official weights cannot be downloaded on a fresh machine, so `python train.py` with no arguments makes its
own: a VAE of the FLUX architecture trained on the synthetic panels (once, then cached), and CLIP and T5
encoders of the official architectures with tokenizer files learned from the dataset's captions. They are
written in the official folder layout (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/, ae.safetensors)
and read back through the same loaders as the official files, so the small run exercises the real code paths.
The text encoders stay at their random initialisation (frozen, as in FLUX): random features of the caption
still tell the transformer which classes a scene holds.

The default's VAE ships with the package (embedded_vae.safetensors, 1.5 MB), so the default run does not spend
its first minutes training it; `python -m minflux.tasks.embedded --out FILE` trains it again, the same weights bit
for bit on a CPU with the same kernels and thread count (the file names them). Any other recipe (--vae-steps, --seed,
--panel-size, a data folder) trains its own VAE, cached under OUT/cache/. FLUX.2's embedded default
(minflux.tasks.embedded_flux2) trains and ships its VAE with the same functions, given Flux2AutoEncoder.
"""

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import sentencepiece
import torch
import torch.distributed as dist
from einops import rearrange

from minflux.autoencoder import AutoEncoder, AutoEncoderParams, Flux2AutoEncoder
from minflux.clip import CLIPParams, CLIPTextModel
from minflux.files.load import load_ae, load_clip, load_t5
from minflux.files.tokenizers import write_clip_tokenizer, write_t5_tokenizer
from minflux.files.weights import read_metadata, save_atomic
from minflux.presets import configs
from minflux.t5 import T5Encoder, T5Params
from minflux.tasks.data import captions, triptychs
from minflux.tasks.progress import Progress, log, rank
from minflux.tasks.runs import TrainConfig
from minflux.tasks.scenes import SyntheticTriptychs, split_triptych

# The small text encoders: the official architectures at a width a CPU trains around in seconds.
SMALL_CLIP_WIDTH, SMALL_T5_WIDTH = 64, 64
# The VAE of the default recipe (TrainConfig's defaults), as `python -m minflux.tasks.embedded` trains it.
SHIPPED_VAE = Path(__file__).with_name("embedded_vae.safetensors")
# What the shipped VAE was trained with (TrainConfig's defaults): a run of generated scenes with these reads it.
SHIPPED_SETTINGS = {k: getattr(TrainConfig, k) for k in ("panel_size", "seed", "vae_steps")}
VAE_SCENES = 512  # the VAE learns on 512 scenes (vae_scenes)
VAEKind = type[AutoEncoder] | type[Flux2AutoEncoder]  # FLUX.1's VAE or FLUX.2's


def embedded_parts(cfg, train_set, run: Path, device):
    """(ae, clip, t5) of the embedded default, read through the official loaders: the small VAE trained on the
    training panels (cached under OUT/cache/ by its settings, copied into the run folder), and CLIP and T5 written
    into the run folder. The first process trains and writes; the others wait for it, then read."""
    ae_path = default_vae(cfg, train_set, AutoEncoder, SHIPPED_VAE, "python -m minflux.tasks.embedded")
    if rank() == 0:
        write_text_encoders(run, run_captions(train_set), seed=cfg.seed)
    if dist.is_initialized():
        dist.barrier()
    ae = vae_into_run(ae_path, run)
    clip, t5 = load_clip(run / "text_encoder"), load_t5(run / "text_encoder_2", max_length=cfg.t5_max_length)
    return ae.to(device), clip, t5


def default_vae(cfg, train_set, model: VAEKind, shipped: Path, command: str) -> Path:
    """The file of the run's VAE (an AutoEncoder or a Flux2AutoEncoder, `model`, of the preset's ae_params): the
    `shipped` one when the run's recipe is its (`command` trains it again), else the one cached under OUT/cache/ by
    its recipe, which the first process trains first if it is not there yet. Only the first process writes."""
    scenes = vae_scenes(train_set)  # [512, 3, 64, 192]
    recipe = vae_recipe(configs[cfg.preset].ae_params, scenes, cfg.vae_steps, seed=cfg.seed, model=model)
    is_shipped = shipped_recipe(shipped) == recipe
    ae_path = shipped if is_shipped else Path(cfg.output_dir) / "cache" / f"ae-{recipe}.safetensors"
    if rank() != 0:
        return ae_path
    if is_shipped:
        log(f"vae: the default's, shipped with minflux ({ae_path.name}; {command} trains it)")
    elif ae_path.exists():
        log(f"vae: cached {ae_path}")
    else:
        differ = [
            f"--{k.replace('_', '-')} {getattr(cfg, k)}"
            for k in SHIPPED_SETTINGS
            if getattr(cfg, k) != SHIPPED_SETTINGS[k]
        ] or ["--data"]
        shipped_with = ", ".join(f"{k} {v}" for k, v in SHIPPED_SETTINGS.items())
        log(
            f"vae: {', '.join(differ)}: not the shipped VAE's recipe ({shipped_with}, generated scenes); training "
            f"this run's own for {cfg.vae_steps} steps first (tens of minutes on a CPU for thousands of steps; the "
            f"progress line shows the ETA), cached as {ae_path}"
        )
        train_autoencoder(configs[cfg.preset].ae_params, scenes, cfg.vae_steps, ae_path, seed=cfg.seed, model=model)
    return ae_path


def vae_into_run(ae_path: Path, run: Path):
    """The VAE read from `ae_path` through the official loader, and (by the first process) written into the run
    folder as ae.safetensors, so that the run folder holds every part in the official layout."""
    ae = load_ae(ae_path)
    if rank() == 0:
        save_atomic(
            ae.state_dict(), run / "ae.safetensors", metadata={"minflux.ae_params": json.dumps(asdict(ae.params))}
        )
    return ae


def run_captions(train_set) -> list[str]:
    """The training set's captions, which the text encoders' tokenizers learn from (said when there are none)."""
    texts = captions(train_set)
    if not any(text.strip() for text in texts):
        log("data: no triptych has a caption (a .txt beside it): every one trains with the empty caption")
    return texts


def write_text_encoders(folder, captions: list[str], seed: int = 0) -> None:
    """Tokenizers learned on the captions and randomly initialised small CLIP and T5, in the official layout under
    `folder` (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/); kept if already there. Captions that are
    all empty (a folder without .txt files) still get tokenizers, learned on the alphabet, to encode "" with."""
    folder = Path(folder)
    text = "\n".join(captions)  # with repeats: the tokenizers learn from how often words occur
    if not text.strip():  # sentencepiece cannot learn from no text at all
        text = " ".join("abcdefghijklmnopqrstuvwxyz")
    if not (folder / "text_encoder_2" / "model.safetensors").exists():
        torch.manual_seed(seed)
        write_clip_tokenizer(folder / "tokenizer", text, num_merges=200)
        vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
        clip = CLIPParams(
            vocab_size=len(vocab),
            hidden_size=SMALL_CLIP_WIDTH,
            intermediate_size=4 * SMALL_CLIP_WIDTH,
            num_layers=2,
            num_heads=2,
        )
        save_encoder(CLIPTextModel(clip), folder / "text_encoder", _clip_config(clip))

        write_t5_tokenizer(folder / "tokenizer_2", text, vocab_size=160, model_type="bpe")
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer_2" / "spiece.model"))
        t5 = T5Params(
            vocab_size=pieces.get_piece_size(),
            d_model=SMALL_T5_WIDTH,
            d_kv=32,
            d_ff=2 * SMALL_T5_WIDTH,
            num_layers=2,
            num_heads=2,
        )
        config = {"model_type": "t5", "feed_forward_proj": "gated-gelu", **asdict(t5)}
        save_encoder(_init_t5(T5Encoder(t5)), folder / "text_encoder_2", config)


def _clip_config(p: CLIPParams) -> dict:
    config = asdict(p)
    config["num_hidden_layers"] = config.pop("num_layers")
    config["num_attention_heads"] = config.pop("num_heads")
    return {"model_type": "clip_text_model", **config}


def _init_t5(model: T5Encoder) -> T5Encoder:
    """T5 leaves the 1/√d of attention to the initialisation; PyTorch's default Linear init ignores that."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def save_encoder(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """A text encoder's folder as transformers writes it: config.json and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items()}
    if "encoder.embed_tokens.weight" in sd:  # tied to shared.weight: stored once, as transformers does
        del sd["encoder.embed_tokens.weight"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_atomic(sd, folder / "model.safetensors")


def vae_scenes(train_set) -> torch.Tensor:
    """What the VAE learns on, [N, 3, S, 3S]: generated scenes, the generator's first 512 at the run's panel size and
    seed however many the run trains on (so the shipped VAE serves every run of its panel size and seed); a triptych
    folder, its first 512 (all of a smaller one)."""
    if isinstance(train_set, SyntheticTriptychs):
        train_set = SyntheticTriptychs(VAE_SCENES, train_set.size, train_set.split, train_set.seed)
    return triptychs(train_set, range(min(len(train_set), VAE_SCENES)))


def vae_recipe(
    params: AutoEncoderParams,
    triptychs: torch.Tensor,
    steps: int,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 2e-3,
    model: VAEKind = AutoEncoder,
) -> str:
    """A hash of everything train_autoencoder's result depends on: the settings, the kind of VAE and the scenes'
    exact pixels. It names the cached VAE files and is stored in each trained file (metadata minflux.vae_recipe)."""
    pixels = hashlib.sha256(triptychs.float().contiguous().numpy().tobytes()).hexdigest()
    settings = ["diptychs twice, panels", asdict(params), steps, batch_size, lr, seed, list(triptychs.shape), pixels]
    if model is not AutoEncoder:  # FLUX.1's recipes hash as they did before FLUX.2's VAE was trained here
        settings.append(model.__name__)
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


def shipped_recipe(path: Path = SHIPPED_VAE) -> str | None:
    """The recipe of a VAE shipped with the package, FLUX.1's by default (None if the file is missing)."""
    return read_metadata(path).get("minflux.vae_recipe") if path.exists() else None


def vae_batch(triptychs: torch.Tensor, step: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """What the VAE will encode and decode in the tasks: two steps in three, diptychs [visible | infrared] of one
    scene (Fill's image and condition, whose infrared half is what the held-out evaluation decodes); one in three,
    single panels of any kind (Kontext's target and references, the semantic panel's tokens). GroupNorm normalises
    over the whole image, so the VAE learns on the mixes of panels it meets (the map beside itself, of
    --semantic-layout diptych, has the statistics of the map alone). [B, 3, S, 2S], or [2B, 3, S, S]: the same
    pixels. (Giving a third of the steps to the map beside itself instead cost 2.2 dB on the infrared panels.)"""
    visible, infrared, semantic = split_triptych(triptychs)  # [N, 3, S, S] each, views
    if step % 3 != 2:
        idx = torch.randint(len(triptychs), (batch_size,), generator=g)
        return torch.cat((visible[idx], infrared[idx]), dim=-1)  # [4, 3, 64, 128]
    idx = torch.randint(len(triptychs), (2 * batch_size,), generator=g)
    kind = torch.randint(3, (2 * batch_size,), generator=g)  # visible, infrared or semantic
    return torch.stack([(visible, infrared, semantic)[k][i] for i, k in zip(idx.tolist(), kind.tolist())])


def train_autoencoder(
    params: AutoEncoderParams,
    triptychs: torch.Tensor,
    steps: int,
    path: Path,
    batch_size: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    model: VAEKind = AutoEncoder,
) -> Path:
    """A FLUX-architecture VAE (`model`: FLUX.1's AutoEncoder or FLUX.2's Flux2AutoEncoder) trained on the scenes'
    panels (`triptychs` [N, 3, S, 3S]), written to `path`.

    Loss: L1 + MSE reconstruction and a small KL term, the latent sampled as the official VAE was trained (FLUX.2's
    1x1 quant convs are part of its encoder and decoder). The latent's statistics are then measured, so that
    encode() gives latents of zero mean and unit variance: one scale and shift for FLUX.1, as its 0.3611 / 0.1159
    were; for FLUX.2, the batch norm's running mean and variance of each of the 128 channels of the patchified latent.
    """
    recipe = vae_recipe(params, triptychs, steps, seed, batch_size, lr, model)  # of the settings, before the statistics
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = model(params).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps, label="vae ")
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine decay to 0: the last steps polish at a small learning rate
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        x = vae_batch(triptychs, step, batch_size, g)  # [4, 3, 64, 128]
        moments = ae.encoder(x)  # [4, 32, 8, 16]: mean and log-variance (FLUX.2: [4, 64, 8, 16])
        mean, logvar = moments.chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        recon = ae.decoder(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            progress.update(step, loss=loss.item())
    ae.eval()
    with torch.no_grad():  # measure the latent statistics, as FLUX's scale and shift were measured
        means = [ae.encoder(vae_batch(triptychs, k, 32, g)).chunk(2, dim=1)[0] for k in (1, 2, 3)]
        # the latent means of the three kinds of batch, pooled: [32, 16, 8, 16], [64, 16, 8, 8], [32, 16, 8, 16]
    if model is AutoEncoder:
        mean = torch.cat([m.flatten() for m in means])
        params = replace(params, shift_factor=mean.mean().item(), scale_factor=1 / mean.std().item())
        trained = AutoEncoder(params)
        trained.load_state_dict(ae.state_dict())
    else:  # FLUX.2 normalises each channel of the patchified latent, as Flux2AutoEncoder.encode patchifies it
        p = ae.patch
        z = torch.cat([rearrange(m, "b c (i pi) (j pj) -> (b i j) (c pi pj)", pi=p, pj=p) for m in means])  # [N, 128]
        ae.bn.running_mean.copy_(z.mean(dim=0))
        ae.bn.running_var.copy_(z.var(dim=0))
        trained = ae
    metadata = {
        "minflux.ae_params": json.dumps(asdict(params)),
        "minflux.vae_recipe": recipe,
        "minflux.trained_with": f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
                                f"{torch.get_num_threads()} threads",
    }  # fmt: skip
    save_atomic(trained.state_dict(), path, metadata=metadata)
    return path


def main(argv=None) -> int:
    """python -m minflux.tasks.embedded --out FILE: the default's VAE, trained as the shipped one was."""
    return vae_command(
        argv, "python -m minflux.tasks.embedded", main.__doc__, AutoEncoder, TrainConfig.preset, SHIPPED_VAE
    )


def vae_command(argv, prog: str, description: str, model: VAEKind, preset: str, shipped: Path) -> int:
    """The command line that trains an embedded default's VAE (`model` of `preset`'s ae_params) on TrainConfig's
    default scenes, as its `shipped` file was. Exit status 2, and nothing written, for an existing --out."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--out",
        required=True,
        help=f"the file to write (the shipped one: {shipped.name} in "
        "minflux/tasks/); an existing file is kept unless --overwrite",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--steps",
        type=int,
        default=TrainConfig.vae_steps,
        help="training steps (default: the "
        "default's, %(default)s); another number is another recipe, which the default run does not read",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps {args.steps}: expected a number of steps >= 1", file=sys.stderr)
        return 2
    cfg = TrainConfig()
    scenes = vae_scenes(SyntheticTriptychs(cfg.train_samples, cfg.panel_size, "train", cfg.seed))  # [512, 3, 64, 192]
    train_autoencoder(configs[preset].ae_params, scenes, args.steps, out, seed=cfg.seed, model=model)
    log(f"vae: wrote {out}, recipe {read_metadata(out)['minflux.vae_recipe']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
