"""Reading a config file, applying ``--section.key value`` overrides, and type-checking into :class:`Config`.

    >>> cfg = load_config(None, ["--parallel.tensor.size=2", "--model.checkpoint", "0.5"])
    >>> cfg.parallel.tensor.size, cfg.model.checkpoint
    (2, 0.5)

Override values are Python literals where they parse (``4096``, ``True``, ``(1, 2)``, ``None``), else strings.
Unknown keys get a "did you mean" suggestion; InternEvo keys without effect are collected into one warning.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import runpy
import traceback
import typing
import warnings
from functools import lru_cache
from pathlib import Path

from .config import Config
from .config_rules import IGNORED, check_choices, check_ignored


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a Python config file (None = all defaults), apply ``--section.key value`` overrides, validate."""
    raw = read_config_file(path) if path is not None else {}
    apply_overrides(raw, overrides or [])
    return from_dict(raw, source=str(path) if path is not None else "defaults")


def read_config_file(path: str | Path) -> dict:
    """Execute the config file and return its lower-case, non-module, non-callable top-level names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; give the path of a Python config file "
                         "(e.g. configs/demo.py)")
    try:
        namespace = runpy.run_path(str(path))
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # the file's own code raised (a NameError, a failed import, a missing file it reads)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise ValueError(f"config file {path}{where} raised {type(e).__name__}: {e}; fix the file (it is run as "
                         "Python)") from e
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and not inspect.ismodule(v) and not callable(v)}


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """``["--data.seq_len", "4096", "--parallel.tensor.size=2"]`` -> raw["data"]["seq_len"] = 4096, ... (in place).
    Values are Python literals where they parse (``4096``, ``True``, ``(1, 2)``, ``None``), else strings."""
    items, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"override {arg} has no value; write {arg} VALUE")
            key, value = arg[2:], overrides[i + 1]
            i += 2
        items.append((key, value))
    for key, value in items:
        parts = key.split(".")
        node = raw
        for j, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif dataclasses.is_dataclass(child):
                child = node[part] = dataclasses.asdict(child)
            elif not isinstance(child, dict):
                raise ValueError(f"override --{key}: {'.'.join(parts[:j + 1])} is {child!r}, not a section")
            node = child
        node[parts[-1]] = _literal(value)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a Config from nested dicts (the shape of a config file)."""
    ignored: list[str] = []
    cfg = _build(Config, raw, prefix="", source=source, ignored=ignored)
    check_choices(cfg, source)
    if ignored:
        warnings.warn(f"{source}: InternEvo keys without effect in seqpack were ignored: {'; '.join(ignored)}",
                      stacklevel=2)
    return cfg


def _build(cls, raw, prefix: str, source: str, ignored: list):
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'config'} must be a dict(...), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    known_ignored = IGNORED.get(prefix.rstrip("."), {})
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key in known_ignored:
            check_ignored(full, value, source)
            ignored.append(f"{full} ({known_ignored[key]})")
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names + list(known_ignored), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ValueError(f"{source}: unknown config key {full!r}{hint}")
        kwargs[key] = _convert(hints[key], value, full, source, ignored)
    return cls(**kwargs)


def _convert(tp, value, key: str, source: str, ignored: list):
    """Check ``value`` against the annotation ``tp``; nested dataclasses are built from dicts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source, ignored)
            except ValueError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source, ignored)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        tuple: isinstance(value, (tuple, list)),
    }[tp]
    if not ok:
        raise ValueError(f"{source}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        return float(value)
    return tuple(value) if tp is tuple else value


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or None" if type(None) in args else "")
    return {bool: "a bool", int: "an int", float: "a number", str: "a string", dict: "a dict",
            tuple: "a tuple"}.get(tp, getattr(tp, "__name__", str(tp)))


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it in the class body}."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per leaf key: ``--data.seq_len (int, default 256): ...`` (the ``seqpack train --help`` epilog)."""
    lines, hints, docs = [], typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is float and default:
            default = f"{default:.4g}"
        lines.append(f"  --{prefix}{f.name} (default {default}): {docs.get(f.name, '')}")
    return lines
