"""A flat dataclass as command-line flags and as TOML: one flag per field, a TOML file with the same keys.

add_config_flags   one --flag per field (its type, its default in the help)
config_from_args   defaults, then a TOML file (--config), then the flags given
read_toml          a TOML file → the dataclass's fields, unknown keys and (cls.expected) bad values refused
to_toml            the dataclass → TOML text (strings, integers, floats with inf/nan, booleans)
dashed             BFL's underscore spellings of flags accepted (--num_steps → --num-steps)
"""

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from pathlib import Path

# --- flags --------------------------------------------------------------------------


def field_type(f: dataclasses.Field):
    """The plain type of a field: int, float, str, bool (Optional[X] → X)."""
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (our own annotations)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, with the field's comment-free help: its type and default (and cls.CASES's: the
    defaults of other kinds of run, {case: {field: value}})."""
    helps, aliases, cases = getattr(cls, "HELP", {}), getattr(cls, "ALIASES", {}), getattr(cls, "CASES", {})
    for f in dataclasses.fields(cls):
        kind = field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = dict(type=kind, metavar=kind.__name__.upper())
        if kind is bool:  # "--trace" alone means true; "--trace false" is also accepted
            flag = dict(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            *aliases.get(f.name, []),
            dest=f.name,
            default=None,  # None = not given, so the TOML file or the dataclass default applies
            help=f"{helps.get(f.name, '')} (default: {default}{others(cases, f.name)})".strip(),
            **flag,
        )
    parser.add_argument("--config", type=Path, help="a TOML file setting the same fields; flags win over it")


def others(cases: dict[str, dict], name: str) -> str:
    """ "; CASE: VALUE" for each case that sets the field `name` (for --help)."""
    return "".join(f"; {case}: {values[name]}" for case, values in cases.items() if name in values)


def dashed(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with BFL's underscore spellings of the flags (--num_steps, --output_dir) written as this parser's
    (--num-steps, --output-dir), so that commands pasted from the official scripts run."""
    known = parser._option_string_actions  # every option string the parser takes
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "_" in flag and flag.replace("_", "-") in known:
            arg = flag.replace("_", "-") + eq + value
        out.append(arg)
    return out


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass from defaults, then the TOML file, then the flags given. Unknown TOML keys are an error."""
    values = {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config, cls))
    for f in dataclasses.fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def read_toml(path, cls) -> dict:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: cannot read the config: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); TOML files are UTF-8"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from None
    data = {getattr(cls, "RENAMED", {}).get(k, k): v for k, v in data.items()}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    for key, value in data.items():
        expected = cls.expected(key, value) if hasattr(cls, "expected") else None
        if expected:
            raise ValueError(f"{path}: {key} = {written(value)}: expected {expected}")
    return data


def written(value) -> str:
    """A TOML value as it reads in a message: JSON where it has a JSON form, else as TOML writes it (a date, a time)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return f"{value.isoformat() if hasattr(value, 'isoformat') else value} (a {type(value).__name__})"


def to_toml(config) -> str:
    """A flat dataclass as TOML, UTF-8 (None values are left out: absent means default)."""
    return "".join(
        f"{key} = {toml_value(value, key)}\n" for key, value in dataclasses.asdict(config).items() if value is not None
    )


# TOML basic strings escape ", \\ and the control characters (U+0000-U+001F, U+007F); any other character is itself.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def toml_value(value, key: str = "value") -> str:
    """One value as TOML: a string, an integer, a float (inf, -inf and nan included), a boolean, or a list of them.
    JSON is not TOML for inf/nan ("Infinity") nor for characters beyond U+FFFF (JSON writes surrogate pairs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr: "inf", "-inf", "0.001", "1e-05", all TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    if not isinstance(value, str):
        raise TypeError(f"{key}: cannot write a {type(value).__name__} as TOML")
    if any("\ud800" <= c <= "\udfff" for c in value):  # undecodable bytes on the command line, kept as surrogates
        raise ValueError(f"{key}: {value!r} is not valid Unicode text (bytes that are not UTF-8?)")
    return '"' + "".join(_toml_char(c) for c in value) + '"'


def _toml_char(c: str) -> str:
    return _TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
