"""The double- and single-stream blocks drawn from the model's own modules, as Mermaid flowcharts.

    python -m minflux.study.diagram          both blocks (what minflux/study/BLOCKS.md holds; a test keeps them equal)

Each block is built at FLUX.1's size on the meta device and run once on the walk-through's running example
(Kontext at 1024², batch 1: 8192 image tokens, 512 text tokens). Every module it calls, and the attention, becomes a
node with the shape it returns; an arrow goes from A to B when a tensor B reads was computed from A's output,
through whatever plain tensor operations lie between (a split, a concatenation, modulate, the gated residual). The
drawing is the code's own data flow: rename, reorder or rewire a module and the diagram follows.
"""

import argparse
import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from minflux import hooks
from minflux.model import DoubleStreamBlock, Modulation, QKNorm, SingleStreamBlock

UNITS = (Modulation, QKNorm)  # drawn whole (their inner layers are not nodes of their own)
HIDDEN, HEADS, TXT, IMG = 3072, 24, 512, 8192  # FLUX.1; the running example's tokens


def tensors(x) -> list[torch.Tensor]:
    """Every tensor in x: tensors, tuples, lists, dicts and dataclasses (a Modulation's shift, scale, gate)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors(v)]
    if dataclasses.is_dataclass(x):
        return [t for f in dataclasses.fields(x) for t in tensors(getattr(x, f.name))]
    return []


def shape(x) -> str:
    ts = tensors(x)
    parts = [str(list(t.shape)) + (" complex" if t.is_complex() else "") for t in ts]
    return f"{len(parts)} × {parts[0]}" if len(parts) > 1 and len(set(parts)) == 1 else ", ".join(parts)


class Flow(TorchFunctionMode, hooks.Observer):
    """Which nodes each tensor was computed from, while one forward runs; the nodes and the arrows between them."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.sources: dict[int, set[str]] = {}  # id(tensor) → nodes
        self.alive: list[torch.Tensor] = []  # every tensor seen stays alive, so no id is reused
        self.nodes: list[tuple[str, str]] = []  # (node, label)
        self.edges: dict[tuple[str, str], None] = {}
        self.handles = []
        units = [name for name, m in block.named_modules() if isinstance(m, UNITS) and name]
        for name, module in block.named_modules():
            inside = any(name.startswith(u + ".") for u in units)
            if name and not inside and (isinstance(module, UNITS) or not list(module.children())):
                self.handles.append(module.register_forward_pre_hook(self.enter(name, type(module).__name__)))
                self.handles.append(module.register_forward_hook(self.leave))

    def mark(self, x, nodes: set[str]) -> None:
        for t in tensors(x):
            self.sources[id(t)] = set(nodes)
            self.alive.append(t)

    def origin(self, *xs) -> set[str]:
        return set().union(*(self.sources.get(id(t), set()) for x in xs for t in tensors(x)))

    def node(self, label: str, *inputs) -> str:
        node = f"n{len(self.nodes)}"
        self.nodes.append((node, label))
        for source in sorted(self.origin(*inputs), key=lambda n: int(n[1:]) if n[1:].isdigit() else -1):
            self.edges[(source, node)] = None
        return node

    def enter(self, name: str, kind: str):
        def hook(module, args):
            module._diagram_node = self.node(f"{name} ({kind})", args)

        return hook

    def leave(self, module, args, output):
        self.mark(output, {module._diagram_node})
        self.nodes[int(module._diagram_node[1:])] += (shape(output),)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.mark(out, self.origin(args, kwargs or {}))
        return out

    def stage(self, label: str, fn, args: tuple, kwargs: dict):
        if label != "attention":
            return fn(*args, **kwargs)
        node = self.node("attention (q, k, v of every token, RoPE)", args, kwargs)
        out = fn(*args, **kwargs)
        self.mark(out, {node})
        self.nodes[int(node[1:])] += (shape(out),)
        return out


def flow(block: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str]) -> str:
    """The Mermaid flowchart of one forward of `block` on `inputs` (named), its outputs named `outputs`."""
    f = Flow(block)
    entry = {}
    for name, t in inputs.items():
        entry[name] = f"in_{name}"
        f.mark(t, {entry[name]})
    with hooks.observing(f), f:
        out = block(*inputs.values())
    for h in f.handles:
        h.remove()
    out = out if isinstance(out, tuple) else (out,)
    title = f"{type(block).__name__}"
    lines = ["flowchart TB", f'  subgraph {title}["{title}"]']
    lines += [f'    in_{name}(["{name} {shape(t)}"])' for name, t in inputs.items()]
    lines += [f'    {node}["{label}<br/>{out_shape}"]' for node, label, out_shape in f.nodes]
    for name, t in zip(outputs, out):
        lines.append(f'    out_{name}(["{name} {shape(t)}"])')
        for source in sorted(f.origin(t)):
            f.edges[(source, f"out_{name}")] = None
    lines += [f"    {a} --> {b}" for a, b in f.edges]
    lines.append("  end")
    return "\n".join(lines)


def diagrams() -> str:
    """Both blocks, as the Markdown of minflux/study/BLOCKS.md's generated part."""
    meta = torch.device("meta")
    with meta:
        double = DoubleStreamBlock(HIDDEN, HEADS, 4.0, qkv_bias=True)
        single = SingleStreamBlock(HIDDEN, HEADS, 4.0)
        vec = torch.empty(1, HIDDEN)
        pe = torch.empty(1, 1, TXT + IMG, HIDDEN // HEADS // 2, dtype=torch.complex64)
        img, txt, x = torch.empty(1, IMG, HIDDEN), torch.empty(1, TXT, HIDDEN), torch.empty(1, TXT + IMG, HIDDEN)
    first = flow(double, {"img": img, "txt": txt, "vec": vec, "pe": pe}, ["img", "txt"])
    second = flow(single, {"x": x, "vec": vec, "pe": pe}, ["x"])
    return f"```mermaid\n{first}\n```\n\n```mermaid\n{second}\n```\n"


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(diagrams(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
