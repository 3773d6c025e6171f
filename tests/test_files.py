"""Files in and out: outputs readable by others and never half-written, deep images read at their depth, and
loaders that answer every bad file with WeightsError (named cases, then a bounded fuzz)."""

import os
import stat
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from minflux.files.images import read_image, save_png
from minflux.files.weights import WeightsError, save_atomic, write_atomic, write_text_atomic


# --- writing: the umask's mode, atomic, exclusive names ----------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for a test, restored after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_outputs_get_the_umask_mode_not_0600(tmp_path, umask):
    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        files = [
            save_atomic({"w": torch.zeros(2)}, tmp_path / f"{mask}" / "w.safetensors"),
            write_text_atomic(tmp_path / f"{mask}" / "config.toml", "steps = 1\n"),
            save_png(Image.new("RGB", (4, 4)), tmp_path / f"{mask}" / "img.png"),
        ]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(mask), oct(f.stat().st_mode))
        assert list((tmp_path / f"{mask}").glob(".*")) == []  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "metrics.json", "old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_exclusive_write_never_replaces_a_file(tmp_path):
    path = write_text_atomic(tmp_path / "img_0000.png", "first")
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4)), path, exclusive=True)
    assert path.read_text() == "first" and len(list(tmp_path.iterdir())) == 1


def test_threads_taking_names_exclusively_never_share_one(tmp_path):
    """Many writers, each trying names from 0 up: exclusive creation gives every image its own file."""
    taken, errors = [], []

    def writer(k):
        try:
            for _ in range(5):
                i = 0
                while True:
                    try:
                        taken.append(save_png(Image.new("RGB", (4, 4), (k, 0, 0)), tmp_path / f"img_{i:04d}.png",
                                              exclusive=True))  # fmt: skip
                        break
                    except FileExistsError:
                        i += 1
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(taken) == 20 and len(set(taken)) == 20 and len(list(tmp_path.glob("img_*.png"))) == 20
