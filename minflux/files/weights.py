"""Reading and writing weight files: the I/O every loader in minflux shares.

Official weights come as one .safetensors file (flux1-dev.safetensors, ae.safetensors, clip_l.safetensors),
or as a folder in the diffusers / transformers layout (config.json + one file, or several shards listed in a
`*.safetensors.index.json`). This file turns any of those into a plain {key: tensor} dict, lazily, one tensor
at a time, and puts it into a model built on the meta device, so the weights are held in memory once.

Every failure raises `WeightsError` with a message that names the file, the key and what was expected.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
VARIANT_SUFFIXES = {".fp16", ".bf16", ".fp32", ".fp8"}


class WeightsError(ValueError):
    """A weights file, folder or key that cannot be used as asked. The message says what and where."""


class DiskFull(OSError):
    """No space left (or the quota reached) while writing `path`: the file was not written, and nothing half-written
    was left. (torch.save and safetensors report a full disk in words of their own; write_atomic gives this.)"""

    def __init__(self, path):
        path = Path(path)
        super().__init__(errno.ENOSPC, f"no space left on the device of {path.parent} (writing {path.name})")
        self.path = path

    def __str__(self) -> str:
        return self.strerror  # without OSError's "[Errno 28]"


def is_disk_full(e: BaseException | None) -> bool:
    """A full disk or quota anywhere in an exception's chain: an OSError's errno, or the OS's words in the message of
    a writer that wraps it (safetensors: "... No space left on device (os error 28)"). torch.save reports only
    "unexpected pos" when given a path; given a file object, its error's context is the OSError (save_torch)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# --- finding the files -------------------------------------------------------------------------------


def weight_files(path) -> list[Path]:
    """The weight files behind `path`: the file itself, or a folder's shards (from its index json) or files."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    if not path.is_dir():  # reading a FIFO would wait forever, /dev/zero would never end
        raise WeightsError(f"{path}: neither a file nor a folder (a pipe or a device?); expected weight files")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid index file (expected a json object with 'weight_map'): {e}")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise WeightsError(
                f"{index}: 'weight_map' must map each key to a shard's file name, found {json.dumps(weight_map)[:80]}"
            )
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return shards
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    # diffusers folders may hold precision variants beside the main file (model.fp16.safetensors): skip them
    main = [f for f in files if Path(f.stem).suffix not in VARIANT_SUFFIXES]
    files = main or files
    if not files:
        files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not files:
        raise WeightsError(f"{path}: folder holds no .safetensors file (nor an index json listing shards)")
    return files


# --- reading -----------------------------------------------------------------------------------------


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{file}: not a readable .safetensors file (truncated or another format?): {e}") from None


def _load_pickle(file: Path) -> dict:
    """A .pt/.bin/.ckpt file, read with weights_only=True: tensors only, never arbitrary unpickled objects."""
    try:
        with open(file, "rb") as f:
            legacy = f.read(4) == b"\x80\x02\x8a\x0a"  # the pickled magic number of the format before torch 1.6's zip
    except OSError as e:
        raise WeightsError(f"{file}: cannot be read: {e}") from None
    if legacy:
        raise WeightsError(
            f"{file}: a torch file in the legacy format (before torch 1.6, not a zip archive). minflux reads torch "
            "files memory-mapped, which needs the zip format. Convert it once to safetensors, in an environment you "
            f"trust: python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{file}', "
            f"weights_only=True), '{file.with_suffix('.safetensors')}')\""
        )
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a bad or unsafe pickle
        raise WeightsError(f"{file}: cannot be read as a weights-only torch checkpoint: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{file}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def read_shapes(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name)} for every tensor behind `path`, without reading any tensor data."""
    shapes = {}
    for file in weight_files(path):
        if file.suffix in PICKLE_SUFFIXES:
            shapes.update({k: (tuple(v.shape), str(v.dtype)) for k, v in _load_pickle(file).items()})
            continue
        with _open(file) as f:
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key] = (tuple(s.get_shape()), s.get_dtype())
    return shapes


def read_json(file: Path) -> dict:
    """A config.json as a dict; WeightsError naming the file if it is not a json object."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{file}: not valid json: {e}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{file}: expected a json object, found {type(config).__name__}")
    return config


def read_metadata(path) -> dict[str, str]:
    """The string metadata stored in the (first) safetensors header, {} if none."""
    file = weight_files(path)[0]
    if file.suffix in PICKLE_SUFFIXES:
        return {}
    with _open(file) as f:
        return dict(f.metadata() or {})


def sha256(path) -> str:
    """The file's SHA-256 in hex (what A1111 and CivitAI name LoRAs by; a run records its files with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """To `dtype`; with dtype None, floating tensors keep theirs, except fp8 (storage only) which becomes bf16."""
    if not t.is_floating_point():
        return t
    if dtype is None:
        dtype = torch.bfloat16 if t.dtype in FP8_DTYPES else t.dtype
    return t.to(dtype)


def read_state_dict(path, dtype: torch.dtype | None = None, select=None) -> dict[str, torch.Tensor]:
    """{key: tensor} for the tensors behind `path` whose key passes `select` (all when None), cast by `cast`.

    Tensors are read one at a time from the memory-mapped file. A ComfyUI-style "scaled fp8" file stores
    `W_fp8` and `W.scale_weight`; the product is what the model uses, so it is applied here.
    """
    sd = {}
    for file in weight_files(path):
        if file.suffix in PICKLE_SUFFIXES:
            raw = _load_pickle(file)
            sd.update({k: v for k, v in raw.items() if select is None or select(k)})
            continue
        with _open(file) as f:
            keys = list(f.keys())
            for key in keys:
                if key.endswith(".scale_weight") or key == "scaled_fp8" or (select and not select(key)):
                    continue
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as e:
                    raise WeightsError(f"{file}: tensor {key!r} cannot be read (truncated file?): {e}") from None
                scale_key = key[: -len("weight")] + "scale_weight" if key.endswith("weight") else None
                if scale_key in keys:
                    t = t.to(torch.float32) * f.get_tensor(scale_key).to(torch.float32)
                    t = t.to(dtype or torch.bfloat16)
                sd[key] = t
    return {k: cast(v, dtype) for k, v in sd.items()}


# --- checking what a file says: the sizes a model is built from, its metadata -------------------------


@contextlib.contextmanager
def sizes_of(source, what: str):
    """Where a model's sizes are read off a file's shapes, and the model is built from them: shapes that make no
    such model (a tensor of another rank, a zero size, sizes that do not divide) raise WeightsError."""
    try:
        yield
    except WeightsError:
        raise
    except (ValueError, TypeError, IndexError, ZeroDivisionError, RuntimeError) as e:
        raise WeightsError(f"{source}: its tensor shapes make no {what} ({type(e).__name__}: {e})") from None


def metadata_json(metadata: dict, key: str, fields: dict, source) -> dict | None:
    """The json object a minflux file keeps in its header under `key` (None if absent), with `fields` {name: what
    each must be, as a check} present and valid; else WeightsError naming the file and the key."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source}: metadata {key!r} is not valid json: {e}") from None
    for name, valid in fields.items():
        if not isinstance(value, dict) or name not in value or not valid(value[name]):
            raise WeightsError(f"{source}: metadata {key!r} has no valid {name!r} (found {metadata[key][:80]!r})")
    return value


def numbered(keys, prefix: str, source) -> int:
    """How many numbered blocks the keys hold under `prefix` ("encoder.block." → 0, 1, ...): checked to run 0 … n-1,
    so a renamed key can never ask for a model of a billion blocks."""
    found = {k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)}
    if not all(i.isdigit() for i in found) or sorted(int(i) for i in found) != list(range(len(found))):
        shown = ", ".join(sorted(found, key=lambda i: (len(i), i))[:6])
        raise WeightsError(f"{source}: the blocks under {prefix!r} are numbered {shown}; expected 0, 1, ... n-1")
    return len(found)


def is_sizes(n: int):
    """A check: a list of n sizes (integers from 1 to 4096)."""
    return lambda v: isinstance(v, list) and len(v) == n and all(type(x) is int and 0 < x <= 4096 for x in v)


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def layers_agree(configured, held: int, source) -> None:
    """A config.json's layer count must be the weights' own (a model is built from it before any tensor loads)."""
    if configured != held:
        raise WeightsError(f"{source}: the config says {configured!r} layers, the weights hold {held}")


# --- putting weights into a model --------------------------------------------------------------------


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source, what: str = "model") -> torch.nn.Module:
    """Load `sd` into `model` (usually built on the meta device) with strict key and shape checks.

    The tensors are assigned, not copied, so no second copy of the weights is made. Any mismatch raises
    WeightsError naming `source`, the keys and the shapes expected.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        lines = [f"{source}: the weights do not match the {what}'s keys"]
        if missing:
            lines.append(f"  missing {len(missing)} key(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:5])}")
        raise WeightsError("\n".join(lines))
    for key, t in sd.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{source}: key {key!r} has shape {list(t.shape)}, the {what} expects {list(expected[key].shape)}"
            )
        if expected[key].is_floating_point() and not t.is_floating_point():
            raise WeightsError(
                f"{source}: key {key!r} holds {str(t.dtype).removeprefix('torch.')} numbers; the "
                f"{what} expects floating point"
            )
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# --- writing ---------------------------------------------------------------------------------------------


def write_atomic(path, write, exclusive: bool = False) -> Path:
    """Call write(tmp_path), then rename tmp_path onto path: readers never see half a file, even after a crash.

    The temporary file is `.NAME.RANDOM.tmp` beside `path` (what a run cleans when it resumes after a crash). Files
    get the mode any normal write gets (0666 less the umask), so others on a shared machine can read them.
    exclusive: never replace an existing file: FileExistsError if `path` exists, decided atomically (a hard link),
    so two processes never take one name. A full disk raises DiskFull, the temporary file removed."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to open(path, "w")
        mode = tmp.stat().st_mode
        write(str(tmp))
        if tmp.stat().st_mode != mode:  # the writer made a file of its own (safetensors makes it 0600)
            os.chmod(tmp, stat.S_IMODE(mode))
        if exclusive:
            os.link(tmp, path)  # fails if path exists, whoever made it
        else:
            os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch(obj, path) -> Path:
    """torch.save through write_atomic, writing to a file object so that a full disk is reported as such."""

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write)


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece: the shards of a sharded (FSDP) parameter gathered from every process, which must
    all call this in the same order; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file through a temporary file and a rename, so a crash never leaves half a file.
    Sharded tensors are gathered first, one at a time to the host (every process of an FSDP run calls this)."""
    tensors = {k: whole(v.detach()).cpu().contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
