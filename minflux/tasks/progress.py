"""Which process this is under torchrun, and what it prints: one progress line, and a message printed once.

rank, world, log          which process this is (0 alone, or under torchrun), how many; print on the first
Progress                  one progress line: step, rate, ETA and whatever the caller adds
smooth, format_seconds    a running mean (the loss curve), a duration as H:MM:SS
"""

import math
import sys
import time

import torch.distributed as dist

# --- processes ----------------------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args):
    """print, on the first process only."""
    if rank() == 0:
        print(*args, flush=True)


# --- progress -----------------------------------------------------------------------------------------------


class Progress:
    """One line, rewritten in place on a terminal: step, rate, ETA, and whatever the caller adds."""

    def __init__(self, total: int, label: str = "", stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, step: int, **fields) -> None:
        if rank() != 0:  # under torchrun every process counts the same steps: one line is enough
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"{self.label}{step}/{self.total}", f"{rate:.2f} it/s", f"eta {format_seconds(eta)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + " " * 4 + ("\n" if step >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def smooth(xs: list[float], k: int = 20) -> list[float]:
    """The running mean over the last k values (for the loss curve)."""
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
