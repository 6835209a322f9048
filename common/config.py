"""Typed configs: a dataclass schema, a YAML file and ``key=value`` overrides, checked before anything runs.

Every entry point describes its settings as a tree of dataclasses (the schema: one field per
setting, its type and default, a comment saying what it does). :func:`load_config` merges
schema defaults < YAML file < command-line overrides and refuses, with one :class:`InputError`:

- a key the schema does not have, naming the closest valid key (``crop.sise`` -> ``crop.size_px``)
  and the keys that section does have, because a misspelled setting that is silently ignored
  makes a user believe they changed something;
- a value of the wrong type (``train.epochs=ten``), naming the key and the type expected.

Sections typed ``dict[str, Any]`` (or ``Any``) stay open: their keys belong to someone else
(a timm model's kwargs, DeepSpeed's JSON) and are checked there.

The result is a plain (non-struct) ``DictConfig`` with every default filled in and values
converted to their declared types, so the code that reads it can use ``cfg.section.key``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .atomic import atomic_path
from .errors import InputError


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *, schema: type) -> DictConfig:
    """Merge the schema's defaults < YAML file < dot-list overrides, check against ``schema``, resolve."""
    cfg = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, None, "an existing YAML config file", "no such file")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # omegaconf/yaml raise several types for malformed YAML
            raise InputError(path, None, "valid YAML", f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(loaded, DictConfig):
            raise InputError(path, None, "a YAML mapping of settings", f"a {type(loaded).__name__}")
        cfg = OmegaConf.merge(cfg, loaded)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise InputError(None, "command line", "overrides of the form key=value", " ".join(bad))
    for override in overrides:
        # One at a time with OmegaConf.update: a key may reach into a list (slides.0.registration=...),
        # which a merged dot-list cannot.
        key, value = override.split("=", 1)
        try:
            # The YAML value (number, list, mapping, null); an interpolation stays unresolved until the end.
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]), resolve=False)["value"]
            OmegaConf.update(cfg, key, parsed, merge=True, force_add=True)
        except (OmegaConfBaseException, IndexError, TypeError, ValueError) as exc:
            raise InputError(
                None, f"command line [{key}]", "an override key=value that fits the settings", _first_line(exc)
            ) from exc
    # Name where the settings came from; with overrides the key may be in either.
    source = " + ".join(([str(path)] if path is not None else []) + (["command line"] if overrides else [])) or None
    cfg = apply_schema(schema, cfg, source=source)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise InputError(path, getattr(exc, "full_key", None), "interpolations that resolve", _first_line(exc)) from exc
    return cfg


def apply_schema(schema: type, cfg: Mapping | DictConfig | None, source: str | Path | None = None) -> DictConfig:
    """``cfg`` over the defaults of the dataclass ``schema``; unknown keys and wrong types raise InputError.

    Run functions call this on whatever they are given (a loaded config, a dict from a test or a
    notebook), so every route into a stage is checked the same way.
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if cfg is None:
        cfg = {}
    user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    check_keys(schema, user, source=source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), user)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or None
        expected = _field_type_name(schema, key) if key else None
        raise InputError(
            source, key, f"a value of type {expected}" if expected else "a valid value", _first_line(exc)
        ) from exc
    # Plain containers from here on: the checks are done, and stages may add derived keys.
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=False))


def check_keys(schema: type, cfg: Any, source: str | Path | None = None, prefix: str = "") -> None:
    """Raise InputError at the first key of ``cfg`` that ``schema`` (a dataclass) does not define."""
    if not isinstance(cfg, (Mapping, DictConfig)):
        return  # a wrong type for a section is reported by the typed merge, with its key
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    keys = cfg.keys() if not isinstance(cfg, DictConfig) else list(cfg.keys())
    for key in keys:
        full = f"{prefix}{key}"
        if key not in names:
            raise InputError(
                source,
                full,
                f"one of the keys {prefix.rstrip('.') or 'the top level'} defines ({', '.join(names)})",
                _unknown_key_found(schema, prefix, names, str(key)),
            )
        value = cfg[key] if not isinstance(cfg, DictConfig) else cfg._get_node(key)
        annotation = hints[key]
        section = _dataclass_of(annotation)
        if section is not None:
            if isinstance(value, (DictConfig, Mapping)):
                check_keys(section, value, source, prefix=f"{full}.")
            elif not _is_none(value):
                keys_of = ", ".join(f.name for f in dataclasses.fields(section))
                raise InputError(source, full, f"a section of settings ({keys_of})", repr(_plain(value)))
        elif isinstance(value, (DictConfig, Mapping)):
            record = _dataclass_of(_dict_value(annotation))
            if record is not None:  # dict[str, Record]: each value is a section
                for name in list(value.keys()):
                    check_keys(record, value[name], source, prefix=f"{full}.{name}.")
        elif isinstance(value, (ListConfig, list, tuple)):
            record = _dataclass_of(_list_element(annotation))
            if record is not None:
                for i, item in enumerate(value):
                    check_keys(record, item, source, prefix=f"{full}[{i}].")


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key path the schema defines (sections and leaves), for suggestions and docs."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        out.append(full)
        inner = _dataclass_of(hints[f.name])
        if inner is not None:
            out.extend(schema_keys(inner, f"{full}."))
    return out


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    return path


def _unknown_key_found(schema: type, prefix: str, names: list[str], key: str) -> str:
    suggestion = _closest_key(schema, prefix, names, key)
    return "an unknown key" + (f"; did you mean `{suggestion}`?" if suggestion else "")


def _closest_key(schema: type, prefix: str, names: list[str], key: str) -> str | None:
    """The valid key a user most likely meant, or None.

    A close spelling at the same level first (`crop.sise` -> `crop.size_px`); then an abbreviation
    (`learning_rate` -> `lr`: the valid name's letters appear in order in the key, same first
    letter); then a close leaf name anywhere below (`every_step` -> `checkpoint.every_steps`).
    """
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"{prefix}{close[0]}"
    abbreviations = [n for n in names if len(n) >= 2 and n[0] == key[0] and _is_subsequence(n, key)]
    if len(abbreviations) == 1:
        return f"{prefix}{abbreviations[0]}"
    leaves = {p.rsplit(".", 1)[-1]: p for p in schema_keys(schema, prefix)}
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
    return leaves[near[0]] if near else None


def _is_subsequence(short: str, long: str) -> bool:
    letters = iter(long)
    return all(char in letters for char in short)


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "_is_none") and value._is_none())


def _plain(value: Any) -> Any:
    return value._value() if hasattr(value, "_value") else value


def _type_name(annotation: Any) -> str:
    """``int``, ``float or null``, ``list[str]`` — how a user reads a declared type."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any value"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if dataclasses.is_dataclass(annotation):
        return "a section of settings"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside ``X``, ``Optional[X]`` or ``X | None``; None for anything else."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_of(inner[0])
    return None


def _dict_value(annotation: Any) -> Any:
    """V of ``dict[str, V]`` (or Optional of it); None for anything else."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    if typing.get_origin(annotation) in (dict, dict):
        args = typing.get_args(annotation)
        return args[1] if len(args) == 2 else None
    return None


def _list_element(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    if typing.get_origin(annotation) in (list, tuple, list, tuple):
        args = typing.get_args(annotation)
        return args[0] if args else Any
    return None


def _field_type_name(schema: type, full_key: str) -> str | None:
    """Readable declared type of a dotted key (``train.epochs`` -> ``int``), or None if not found."""
    node: Any = schema
    annotation: Any = None
    for part in full_key.replace("]", "").replace("[", ".").split("."):
        if part.isdigit():
            annotation = _list_element(annotation)
            node = _dataclass_of(annotation)
            continue
        node = _dataclass_of(node) if not (isinstance(node, type) and dataclasses.is_dataclass(node)) else node
        if node is None:
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        annotation = hints[part]
        node = annotation
    if annotation is None:
        return None
    return _type_name(annotation)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
