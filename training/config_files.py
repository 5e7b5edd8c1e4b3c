"""Typed training configurations read from YAML or TOML files.

A training run is described by a frozen dataclass (``TeacherTrainConfig`` …); files only override
the fields they name. Unlike :func:`model.config.from_dict`, which deliberately ignores the extra
keys of official ResShift configs, this reader is strict: an unknown key or a value of the wrong
type stops the run at start-up with the dotted path of the culprit, because a misspelt
``weight_decay`` silently ignored would only show up days later as a worse model.

Partial nested blocks are merged onto the field's *default value*, not the class defaults, so
``degradation: {second: {blur_prob: 0.5}}`` keeps every other second-stage setting.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from model.errors import VPDSRError

T = TypeVar("T")

PRESETS = Path(__file__).parent / "configs"


class ConfigError(VPDSRError):
    """A training configuration file that is missing, malformed or does not fit its schema."""


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a preset in ``training/configs`` (``teacher-small``)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS / f"{name}.yaml"
    if path.suffix == "" and preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"config not found: {name} (presets: {known})")


def read_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a ``.yaml``/``.yml`` or ``.toml`` file."""
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"section.field=value"`` from the command line → ``("section.field", value parsed as YAML)``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the raw mapping with each dotted ``section.field`` set to its value."""
    out = dict(data)
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> T:
    """Build ``cls`` from its defaults, the file at ``path`` (or preset name) and dotted overrides."""
    data = read_file(resolve_config_path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return merge(cls(), data)  # type: ignore[call-arg]


def merge(base: T, data: dict[str, Any], where: str = "") -> T:
    """A copy of the dataclass instance ``base`` with the fields named in ``data`` replaced."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    cls = type(base)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    changes = {
        name: _convert(hints[name], value, getattr(base, name), f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return dataclasses.replace(base, **changes)  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _convert(hint: Any, value: Any, default: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, default if _matches(option, default) else None, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {options}")
    if dataclasses.is_dataclass(hint):
        base = default if isinstance(default, hint) else hint()  # type: ignore[operator]
        return merge(base, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, None, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, None, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint in (int, bool, str):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r}")


def _matches(hint: Any, value: Any) -> bool:
    return dataclasses.is_dataclass(hint) and isinstance(value, hint)  # type: ignore[arg-type]


def to_plain(obj: Any) -> Any:
    """JSON-ready copy of a config (dataclasses → dicts, tuples → lists, paths → strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj

