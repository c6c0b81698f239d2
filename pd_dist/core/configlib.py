"""Typed-config machinery: YAML/dict -> nested dataclasses, validated, with `a.b=c` overrides.

Each component owns its config dataclass (fields documented with ``metadata={"doc": ...}``) and an
optional ``validate(self, prefix)`` method. This module turns plain dicts into those dataclasses,
rejecting unknown keys and wrong types by their full dotted name, before any process group starts.
Every field gets its type's bounds here: ints in int32 (unless the field's metadata has ``int_bits``),
floats finite and representable in fp32, choices matched by type, strings without control characters;
``validate`` adds what a key's meaning needs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Hashable
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A bad experiment config. The message is one line naming the key and what is allowed."""


MAX_DEPTH = 64  # config files nest a few levels; deeper input is refused before it can exhaust the stack
MAX_VALUES = 100_000  # a config holds hundreds; a bound on what aliases may expand to
_MERGE, _VALUE = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"


class ConfigLoader(yaml.SafeLoader):
    """YAML for configs: safe (no python tags), numbers as YAML 1.2 reads them (`1e-3` is a float, not
    the string YAML 1.1 makes of it; `1:30` is a string, not 1.1's sexagesimal 90; `012` is not octal),
    merge keys (`<<: *base`) spread a mapping under the explicit keys (which win), a key given twice
    in one mapping is refused rather than silently overwritten, a list or mapping used as a key is
    refused, and nesting deeper than MAX_DEPTH levels is refused."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"{_where(self.peek_event().start_mark)}: not valid config YAML (nested more "
                                  f"than {MAX_DEPTH} levels deep)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node):
        # SafeConstructor.construct_mapping calls this first on every mapping, and on each mapping merged
        # into another: the one place to see a mapping's own keys before merged ones are spread in.
        if not getattr(node, "_keys_checked", False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                if key_node.tag == _VALUE:  # the YAML '=' key, a string (as SafeConstructor reads it)
                    key_node.tag = "tag:yaml.org,2002:str"
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    what = "mapping" if isinstance(key, dict) else type(key).__name__
                    raise ConfigError(f"{_where(key_node.start_mark)}: a {what} cannot be a config key "
                                      "(keys are names)")
                if key in seen:
                    raise ConfigError(f"{key_node.start_mark.name}: key {key!r} given twice in one mapping "
                                      f"(lines {seen[key]} and {key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line + 1
            node._keys_checked = True
        super().flatten_mapping(node)


def _where(mark) -> str:
    return f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"


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
    """Parse config YAML with ConfigLoader; bad input (syntax, control characters, an integer too long
    to convert) is one ConfigError line with file, line and column."""
    loader = None
    try:
        loader = ConfigLoader(text)  # the reader refuses control characters here already
        loader.name = name  # marks (line/column in messages) name the file
        return _unshare(loader.get_single_data(), [MAX_VALUES], name)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ConfigError(f"{name}, line {line}, column {column}: not valid YAML (control character "
                          f"#x{e.character:04x} is not allowed)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _where(mark) if mark else name
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: not valid YAML ({' '.join(what.split())})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML ({' '.join(str(e).split())})") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        # a scalar the YAML constructors cannot convert: an integer of thousands of digits (Python's
        # conversion limit), a date like 2024-13-45
        what = " ".join(str(e).split(";")[0].split())[:200]
        raise ConfigError(f"{name}: not valid config YAML ({what})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _unshare(x: Any, budget: list[int], name: str, depth: int = 0) -> Any:
    """A copy of loaded YAML in which no two places share one list or mapping: an alias (or a merged
    mapping) then behaves as if written out, so a --set override of one place leaves the others alone.
    Aliases can nest (even recursively) and expand exponentially: deeper than MAX_DEPTH levels or more
    than MAX_VALUES values in all is refused."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        what = f"more than {MAX_VALUES:,} values" if budget[0] < 0 else f"nested more than {MAX_DEPTH} levels deep"
        raise ConfigError(f"{name}: not valid config YAML ({what} once its aliases are expanded)")
    if isinstance(x, dict):
        return {k: _unshare(v, budget, name, depth + 1) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshare(v, budget, name, depth + 1) for v in x]
    return x


def quote(text: str) -> str:
    """'text' for messages; repr(text) where it holds a newline or another control character, so that a
    message stays one readable line."""
    return f"'{text}'" if str(text).isprintable() else repr(text)


# Values in messages: short, one line, and bounded even for a list of aliases that expands exponentially.
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 200
_SHOW.maxlong = 100
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 10
_SHOW.maxlevel = 4


def show(value: Any) -> str:
    """repr(value) for messages: one line, at most a few hundred characters."""
    return _SHOW.repr(value)


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"config key {quote(key)} = {show(value)}: {allowed}")


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


# Every int field holds a count, size, step, rank or id: beyond int32 it is a typo (or would overflow an
# int32 tensor or C int), unless the field's metadata says ``int_bits=63`` (seeds, character counts).
INT_BITS = 31
# Every float field must survive conversion to fp32, which the run computes in: no overflow to inf, no
# flush of a nonzero value to 0 (or to a subnormal, which GPUs may flush). Keys whose meaning needs a
# narrower range check it in their validate().
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38  # the smallest normal fp32


def in_choices(value: Any, allowed: tuple) -> bool:
    """``value in allowed`` by type as well as equality: ``false`` and ``3.0`` are not the ints 0 and 3."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _coerce(key: str, value: Any, tp, meta=None) -> Any:
    """``value`` checked against field type ``tp`` (and its field's metadata ``meta``)."""
    meta = meta or {}
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        fail(key, value, f"must not be null (expected {getattr(inner, '__name__', inner)})")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, bool) and hasattr(tp, "from_bool"):  # a section's on/off shorthand
            return tp.from_bool(value)
        if not isinstance(value, dict):
            fail(key, value, f"must be a mapping of {tp.__name__} fields")
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            fail(key, value, "must be a list")
        out = [_coerce(f"{key}[{i}]", v, elem, meta) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, value, "must be a mapping")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if not in_choices(value, allowed):
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
        bits = meta.get("int_bits", INT_BITS)
        if not -2 ** bits <= value < 2 ** bits:
            fail(key, value, f"must be in [-2^{bits}, 2^{bits})")
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
        if value and not FP32_TINY <= abs(value) <= FP32_MAX:
            fail(key, value, f"is not what fp32, which the run computes in, represents (0 or a magnitude in "
                 f"[{FP32_TINY:.4g}, {FP32_MAX:.4g}])")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "must be a string")
        if not value.isprintable():  # names and paths: a control character is a paste or encoding error
            fail(key, value, "must not contain control characters (tabs, newlines, NUL, ...)")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def build(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(
                f"unknown config key {quote(full)}; allowed here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(full, data[f.name], hints[f.name], f.metadata)
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
        if allowed is not None and value is not None and not in_choices(value, allowed):
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
        raise ConfigError(f"bad override key {quote(dotted)}")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif isinstance(nxt, bool):  # a section given as its on/off shorthand (`baseline: true`)
            nxt = node[p] = {"enabled": nxt}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {quote(dotted)}: {quote('.'.join(parts[:i + 1]))} is not a mapping")
        node = nxt
    if isinstance(value, bool) and isinstance(node.get(parts[-1]), dict) and "enabled" in node[parts[-1]]:
        node[parts[-1]]["enabled"] = value  # `baseline=true` over a written-out section keeps its other keys
        return
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml value of c): numbers, booleans, null and lists parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} must look like key.path=value")
    key, raw = text.split("=", 1)
    value = load_yaml(raw, f"override {quote(text)}") if raw.strip() else ""
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
