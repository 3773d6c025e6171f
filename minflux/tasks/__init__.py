"""The training tasks that train.py runs, and what they need: data, the embedded default's parts, the run folder.

    runs.py       TrainConfig (flags, TOML, config.toml: one dataclass), read_run
    folders.py    the run folder: made, replaced on --overwrite, resumed; checkpoints
    progress.py   which process this is under torchrun, the progress line
    common.py     Batch (what a task hands the loop), TextCache, the official frozen parts
    vis2ir.py     visible → infrared with FLUX.1-Fill and a semantic map (the default task)
    t2i.py        text-to-image LoRAs on FLUX.1 dev or schnell
    t2i_flux2.py  the same on FLUX.2 klein Base or dev: its parts, ids, schedule shift and samples
    kontext.py    image-editing LoRAs on FLUX.1-Kontext and FLUX.2 from pairs, and the embedded Kontext default
    vis2ir_flux2.py  the embedded FLUX.2 default: the scenes as multi-reference edits on a small FLUX.2
    scenes.py     the generated vis2ir scenes
    data.py       triptych folders and captioned image folders
    pairs.py      edit pairs: targets with instructions, and one or more reference folders (control/, control2/...)
    embedded.py   the embedded default's small VAE and text encoders, made here
    embedded_flux2.py  FLUX.2's embedded default: its small VAE (shipped) and Qwen3 text encoder

A task is a class with `encode()` (everything frozen, once), `build_model()`, `draw(generator)` (a global Batch),
`finish(...)` (evaluation and the run folder's files) and `final_files(model)` (what finish writes, metrics.json last).
"""

from minflux.tasks.kontext import kontext_task
from minflux.tasks.t2i_flux2 import t2i_task
from minflux.tasks.vis2ir import Vis2IRTask

TASKS = {"vis2ir": Vis2IRTask, "t2i": t2i_task, "kontext": kontext_task}
