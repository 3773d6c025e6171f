"""How the study tools watch the model run: one observer at a time, nothing at all while none is open.

`@stage` marks a function or method as a stage of the data flow (pack, denoise, AutoEncoder.encode, ...): with
no observer open, the marked function is called and nothing else happens. `observing(obs)` opens an observer
for a block of code: the shape trace (minflux.study.trace) sees every marked stage, and `AttentionMaps`
(minflux.attention) sees every attention map of the explicit path. Modules are watched with PyTorch's own
forward hooks; the marks are for the plain functions, which have none.
"""

import functools
from contextlib import contextmanager


class Observer:
    """What a study tool may override. The defaults run the stage as is and ignore the attention maps."""

    wants_attention = False  # True: attention runs the explicit path and hands its maps to `attention_probs`

    def stage(self, label: str, fn, args: tuple, kwargs: dict):
        return fn(*args, **kwargs)

    def attention_probs(self, probs) -> None:
        pass


_observer: Observer | None = None


def current() -> Observer | None:
    """The open observer, or None."""
    return _observer


@contextmanager
def observing(obs: Observer):
    """Open `obs` for the enclosed block: one at a time, so that no stage is seen twice."""
    global _observer
    if _observer is not None:
        raise RuntimeError(f"a {type(_observer).__name__} is already open: close it before opening another")
    _observer = obs
    try:
        yield obs
    finally:
        _observer = None


def stage(fn):
    """Mark `fn` as a stage, named by its qualified name ("pack", "AutoEncoder.encode"; a `__call__` by its class)."""
    label = fn.__qualname__.removesuffix(".__call__")

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        if _observer is None:
            return fn(*args, **kwargs)
        return _observer.stage(label, fn, args, kwargs)

    return marked
