"""Typed-config machinery: YAML/dict -> nested dataclasses, validated, with `a.b=c` overrides.

Each component owns its config dataclass (fields documented with ``metadata={"doc": ...}``) and an
optional ``validate(self, prefix)`` method. This module turns plain dicts into those dataclasses,
rejecting unknown keys and wrong types by their full dotted name, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A bad experiment config. The message is one line naming the key and what is allowed."""


class ConfigLoader(yaml.SafeLoader):
    """YAML for configs: safe (no python tags), numbers as YAML 1.2 reads them (`1e-3` is a float, not
    the string YAML 1.1 makes of it; `1:30` is a string, not 1.1's sexagesimal 90; `012` is not octal),
    and a key given twice in one mapping is refused rather than silently overwritten."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"{mark.name}: key {key!r} given twice in one mapping (lines {seen[key]} and "
                                  f"{mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ConfigLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def load_yaml(text: str, name: str = "<config>") -> Any:
    """Parse config YAML with ConfigLoader; a syntax error is one ConfigError line with file, line and
    column."""
    loader = ConfigLoader(text)
    loader.name = name  # marks (line/column in messages) name the file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark else name
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML ({' '.join(str(e).split())})") from None
    finally:
        loader.dispose()


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}' = {value!r}: {allowed}")


def doc(text: str, **kw) -> dict:
    """Field metadata helper: ``x: int = field(default=1, metadata=doc("..."))``."""
    return {"doc": text, **kw}


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        fail(key, value, f"must not be null (expected {getattr(inner, '__name__', inner)})")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(key, value, f"must be a mapping of {tp.__name__} fields")
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            fail(key, value, "must be a list")
        out = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, value, "must be a mapping")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            fail(key, value, "must be one of " + ", ".join(repr(a) for a in allowed))
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "must be an integer")
        if not -2 ** 63 <= value < 2 ** 63:
            fail(key, value, "is outside the 64-bit integer range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "must be a number")
        try:
            value = float(value)
        except OverflowError:
            fail(key, value, "is too large for a floating-point number")
        if not math.isfinite(value):
            fail(key, value, "must be a finite number")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def build(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"unknown config key '{full}'; allowed here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(full, data[f.name], hints[f.name])
    obj = cls(**kwargs)
    validate_tree(obj, prefix)
    return obj


def literal_choices(tp) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) type, else None."""
    _, inner = _is_optional(tp)
    return typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None


def check_choices(obj, prefix: str = "") -> None:
    """Refuse any Literal-typed field of dataclass ``obj`` holding a value outside its choices (for
    configs built directly in code, which do not pass through :func:`build`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value is not None and value not in allowed:
            fail(f"{prefix}.{f.name}" if prefix else f.name, value,
                 "must be one of " + ", ".join(repr(a) for a in allowed))


def validate_tree(obj, prefix: str = "") -> None:
    """Run ``validate(prefix)`` on obj; nested configs were validated when they were built."""
    if hasattr(obj, "validate"):
        obj.validate(prefix)


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = 'a.b.c'``, creating mappings as needed."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key '{dotted}'")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i + 1])}' is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml value of c): numbers, booleans, null and lists parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    value = load_yaml(raw, f"override '{text}'") if raw.strip() else ""
    return key.strip(), value


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def field_docs(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, for docs/config.md and `pd-dist config --keys`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        _, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            rows.extend(field_docs(inner, key))
            continue
        elem = typing.get_args(inner)[0] if typing.get_origin(inner) is list else None
        if elem is not None and dataclasses.is_dataclass(elem):  # a list of entries: the list, then each field
            names = ", ".join(g.name for g in dataclasses.fields(elem))
            rows.append((key, f"list of {{{names}}}", [], f.metadata.get("doc", "")))
            rows.extend(field_docs(elem, f"{key}[]"))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        optional, _ = _is_optional(hints[f.name])
        choices = literal_choices(inner)
        if choices is not None:
            tname = " \\| ".join(str(c) for c in choices)
        else:
            tname = getattr(inner, "__name__", None) if typing.get_origin(inner) is None else None
            tname = tname or str(inner).replace("typing.", "")
        tname += " or null" if optional else ""
        rows.append((key, tname, default, f.metadata.get("doc", "")))
    return rows
