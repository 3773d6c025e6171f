"""Kontext training: image-editing LoRAs on FLUX.1-Kontext and FLUX.2 from pairs, and the embedded Kontext default.

One step, as the Kontext walk-through has it (512 × 512, batch 4):

    control [4, 3, 512, 512] → VAE (mean, cached) → [4, 16, 64, 64] → pack → [4, 1024, 64], ids axis0 = 1
    target  [4, 3, 512, 512] → VAE (mean, cached) → x0 [4, 1024, 64], ids axis0 = 0;  x_t = (1 − t) x0 + t ε
    cat along the sequence → [4, 2048, 64]   (+ the instruction: T5 [4, 512, 4096], CLIP pooled [4, 768])
    v = FLUX(...)[:, :1024], the target's tokens → loss = MSE(v, ε − x0)            (sampling.flow_matching_loss)

t is logit-normal and shifted by the target's token count, as dev's sampling schedule is (Kontext samples with it,
so training sees the noise levels sampling visits). The guidance embedding gets --guidance (1.0 by default, as for
dev's LoRAs: the LoRA learns inside the model it runs in; diffusers' Kontext script defaults to 3.5, and its own
README trains with 1). The data is a folder of targets with instructions and a control/ folder of the same names
(KontextFolder, pairs.py; control2/, control3/ ... add references at axis0 = 2, 3, ...), trained as t2i is: LoRA,
cache, aspect-ratio buckets, samples (T2ITask).

FLUX.2 [klein] Base or [dev] (`--repo FLUX.2-klein-base-4B`): the same pairs, one or more references per target
(Flux2KontextTask), each encoded once by FLUX.2's VAE and placed at t = 10 · (k + 1) on the first RoPE axis, as
FLUX.2's sampling places reference k; 128-channel tokens, the text encoder's stacked states, t shifted as FLUX.2's
schedule is (t2i_flux2.py). Base's samples use its true CFG, the references in both passes.

Without weights, `--task kontext` trains the embedded default: a small Kontext-architecture model from scratch on
the generated scenes as edit pairs, control = the visible panel, target = the infrared panel, instruction = the
caption (--semantic reference adds the semantic map as a second reference, at axis0 = 2). That is the vis2ir task
with the visible panel in the sequence instead of the Fill channels (Vis2IRTask, in_context "kontext");
`--preset flux2-small` trains the same on a small FLUX.2 (vis2ir_flux2.py).
"""

from minflux.flux2 import Flux2Params
from minflux.presets import configs
from minflux.tasks.pairs import KontextFolder
from minflux.tasks.t2i import T2ITask
from minflux.tasks.t2i_flux2 import Flux2T2ITask


class KontextTask(T2ITask):
    """Kontext LoRA training on image-editing pairs, for train.py; held-out pairs are sampled as [control | edited
    | target] grids."""

    what = "pairs, instructions"

    def __init__(self, cfg, run, device, dtype):
        super().__init__(cfg, run, device, dtype)
        n_held = min(cfg.heldout_samples, len(self.data) // 10)  # a tenth, at most heldout_samples: never trained on
        self.held_items = list(range(len(self.data) - n_held, len(self.data)))
        self.train_items = self.train_items[: len(self.data) - n_held]

    def sample_items(self) -> list[int]:
        """Up to four held-out pairs of one size (with fewer than ten pairs none is held out: training pairs)."""
        items = self.held_items or self.train_items
        return [i for i in items if self.data.group(i) == self.data.group(items[0])][:4]

    def dataset(self, cfg):
        return KontextFolder(
            cfg.data, cfg.control, cfg.resolution, cfg.default_caption, cfg.on_error, cfg.buckets, cfg.control_size
        )


class Flux2KontextTask(Flux2T2ITask, KontextTask):
    """Multi-reference edit LoRAs on FLUX.2 [klein] Base or [dev]: KontextTask's pairs and held-out samples with
    Flux2T2ITask's parts; each reference at its own t = 10 · (k + 1), the loss on the target's tokens."""


def kontext_task(cfg, run, device, dtype):
    """--task kontext: pairs on official weights (KontextTask; FLUX.2's: Flux2KontextTask), or the embedded default
    on generated scenes."""
    if cfg.flux:
        return (Flux2KontextTask if cfg.text_encoder else KontextTask)(cfg, run, device, dtype)
    if isinstance(configs[cfg.preset].params, Flux2Params):  # the embedded FLUX.2 default: multi-reference edits
        from minflux.tasks.vis2ir_flux2 import Flux2Vis2IRTask

        return Flux2Vis2IRTask(cfg, run, device, dtype)
    from minflux.tasks.vis2ir import Vis2IRTask

    return Vis2IRTask(cfg, run, device, dtype)
