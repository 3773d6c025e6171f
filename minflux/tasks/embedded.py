"""The embedded default: every FLUX component, small, built and trained here on a CPU.

Official weights cannot be downloaded on a fresh machine, so `python train.py` with no arguments makes its
own: a VAE of the FLUX architecture trained on the synthetic panels (once, then cached), and CLIP and T5
encoders of the official architectures with tokenizer files learned from the dataset's captions. They are
written in the official folder layout (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/, ae.safetensors)
and read back through the same loaders as the official files, so the small run exercises the real code paths.
The text encoders stay at their random initialisation (frozen, as in FLUX): random features of the caption
still tell the transformer which classes a scene holds.
"""

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import sentencepiece
import torch
import torch.distributed as dist

from minflux.autoencoder import AutoEncoder, AutoEncoderParams
from minflux.clip import CLIPParams, CLIPTextModel
from minflux.files.load import load_ae, load_clip, load_t5
from minflux.files.tokenizers import write_clip_tokenizer, write_t5_tokenizer
from minflux.files.weights import save_atomic
from minflux.presets import configs
from minflux.t5 import T5Encoder, T5Params
from minflux.tasks.data import captions, triptychs
from minflux.tasks.scenes import split_triptych
from minflux.tasks.runs import Progress, log, rank

# The small text encoders: the official architectures at a width a CPU trains around in seconds.
SMALL_CLIP_WIDTH, SMALL_T5_WIDTH = 64, 64


def embedded_parts(cfg, train_set, run: Path, device):
    """(ae, clip, t5) of the embedded default, read through the official loaders: the small VAE trained on the
    training panels (cached under OUT/cache/ by its settings, copied into the run folder), and CLIP and T5 written
    into the run folder. The first process trains and writes; the others wait for it, then read."""
    spec = configs[cfg.preset]
    scenes = triptychs(train_set, range(min(len(train_set), 512)))  # [512, 3, 64, 192]
    ae_path = autoencoder_path(spec.ae_params, scenes, cfg.vae_steps, Path(cfg.output_dir) / "cache", seed=cfg.seed)
    if rank() == 0:
        train_autoencoder(spec.ae_params, scenes, cfg.vae_steps, ae_path, seed=cfg.seed, log=log)
        texts = captions(train_set)
        if not any(text.strip() for text in texts):
            log("data: no triptych has a caption (a .txt beside it): every one trains with the empty caption")
        write_text_encoders(run, texts, seed=cfg.seed)
    if dist.is_initialized():
        dist.barrier()
    ae = load_ae(ae_path)
    if rank() == 0:
        save_atomic(ae.state_dict(), run / "ae.safetensors", metadata={"minflux.ae_params": json.dumps(asdict(ae.params))})
    clip, t5 = load_clip(run / "text_encoder"), load_t5(run / "text_encoder_2", max_length=cfg.t5_max_length)
    return ae.to(device), clip, t5


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
            vocab_size=len(vocab), hidden_size=SMALL_CLIP_WIDTH, intermediate_size=4 * SMALL_CLIP_WIDTH,
            num_layers=2, num_heads=2,
        )  # fmt: skip
        _save_encoder(CLIPTextModel(clip), folder / "text_encoder", _clip_config(clip))

        write_t5_tokenizer(folder / "tokenizer_2", text, vocab_size=160, model_type="bpe")
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer_2" / "spiece.model"))
        t5 = T5Params(
            vocab_size=pieces.get_piece_size(), d_model=SMALL_T5_WIDTH, d_kv=32, d_ff=2 * SMALL_T5_WIDTH,
            num_layers=2, num_heads=2,
        )  # fmt: skip
        config = {"model_type": "t5", "feed_forward_proj": "gated-gelu", **asdict(t5)}
        _save_encoder(_init_t5(T5Encoder(t5)), folder / "text_encoder_2", config)


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


def _save_encoder(model: torch.nn.Module, folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items()}
    if "encoder.embed_tokens.weight" in sd:  # tied to shared.weight: stored once, as transformers does
        del sd["encoder.embed_tokens.weight"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_atomic(sd, folder / "model.safetensors")


def autoencoder_path(params: AutoEncoderParams, triptychs: torch.Tensor, steps: int, cache_dir, seed: int = 0,
                     batch_size: int = 4, lr: float = 2e-3) -> Path:  # fmt: skip
    """Where train_autoencoder keeps the VAE of these settings and scenes: named by a hash of them all."""
    key = hashlib.sha256(
        json.dumps(["diptychs twice, panels", asdict(params), steps, batch_size, lr, seed, triptychs.shape, float(triptychs.sum())])
        .encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / f"ae-{key}.safetensors"


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
    params: AutoEncoderParams, triptychs: torch.Tensor, steps: int, path: Path, batch_size: int = 4,
    lr: float = 2e-3, seed: int = 0, log=print,
) -> Path:  # fmt: skip
    """A FLUX-architecture VAE trained on the scenes' panels (`triptychs` [N, 3, S, 3S]), written to `path` (kept if
    there).

    Loss: L1 + MSE reconstruction and a small KL term, the latent sampled as the official VAE was trained. The
    latent's scale and shift are then measured, as FLUX's 0.3611 / 0.1159 were, so that encode() gives latents
    of zero mean and unit variance.
    """
    if path.exists():
        log(f"vae: cached {path}")
        return path

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = AutoEncoder(params).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps, label="vae ")
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine decay to 0: the last steps polish at a small learning rate
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        x = vae_batch(triptychs, step, batch_size, g)  # [4, 3, 64, 128]
        moments = ae.encoder(x)  # [4, 32, 8, 16]: mean and log-variance
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
        mean = torch.cat([ae.encoder(vae_batch(triptychs, k, 32, g)).chunk(2, dim=1)[0].flatten() for k in (1, 2, 3)])
        # the latent means of the three kinds, pooled
    params = AutoEncoderParams(**{**asdict(params), "shift_factor": mean.mean().item(), "scale_factor": 1 / mean.std().item()})
    trained = AutoEncoder(params)
    trained.load_state_dict(ae.state_dict())
    save_atomic(trained.state_dict(), path, metadata={"minflux.ae_params": json.dumps(asdict(params))})
    return path
