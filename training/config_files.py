"""Typed training configurations read from YAML or TOML files.

A training run is described by a frozen pydantic model (``TeacherTrainConfig`` …, all
:class:`Config`); files and ``--set section.field=value`` overrides only change the fields they
name. Unlike :func:`model.config.from_dict`, which deliberately ignores the extra keys of official
ResShift configs, this reader is strict: an unknown key or a value of the wrong type stops the run
at start-up with the dotted path of the culprit, because a misspelt ``weight_decay`` silently
ignored would only show up days later as a worse model. Values are validated as JSON values in
pydantic's strict mode: an integer field takes no 2.0 or "2", a number field no ``true``, a list
becomes a tuple and a string a path.

Partial nested blocks are merged onto the field's *default value*, not the class defaults, so
``degradation: {second: {blur_prob: 0.5}}`` keeps every other second-stage setting.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_jsonable_python

from model.errors import VPDSRError

PRESETS = Path(__file__).parent / "configs"


class Config(BaseModel):
    """Base of the training configurations: immutable, and strict about the keys it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


T = TypeVar("T", bound=Config)


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


def read_config(name: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a config file or preset, over the one its ``extends`` key names (a preset or
    a path): a stage that continues another states only what it changes, not a copy of the rest."""
    path = resolve_config_path(name).resolve()
    if path in seen:
        raise ConfigError(f"config {path.name} extends itself through {' -> '.join(p.name for p in seen)}")
    data = read_file(path)
    base = data.pop("extends", None)
    return data if base is None else _merged(read_config(base, (*seen, path)), data)


def _merged(base: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``base``, nested mappings merged key by key (anything else replaced)."""
    merged = dict(base)
    for key, value in data.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> T:
    """Build ``cls`` from its defaults, the file at ``path`` (or preset name, with what it ``extends``)
    and dotted overrides."""
    data = read_config(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    raw = onto_defaults(cls(), data)
    try:
        return cls.model_validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as exc:
        raise ConfigError(describe(exc, cls)) from None


def onto_defaults(base: Any, data: Any) -> Any:
    """``data`` (a raw mapping) over the plain values of the config ``base``, nested blocks merged
    onto the values of ``base`` itself; keys that ``base`` lacks pass through (validation names them)."""
    if not isinstance(data, dict) or not _is_config(base):
        return data
    merged = to_plain(base)
    names = _field_names(type(base))
    for key, value in data.items():
        merged[key] = onto_defaults(getattr(base, key), value) if key in names else value
    return merged


def to_plain(config: Any) -> Any:
    """JSON-ready copy of a config (models and dataclasses → dicts, tuples → lists, paths → strings)."""
    return to_jsonable_python(config)


def describe(exc: ValidationError, cls: type[Config]) -> str:
    """The validation errors of ``cls``, one per line, each with the dotted path of its field."""
    unknown: dict[tuple[Any, ...], list[str]] = {}
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        where = _dotted(loc) or cls.__name__
        value = err.get("input")
        message = {
            "int_type": f"expected int, got {value!r}",
            "float_type": f"expected a number, got {value!r}",
            "bool_type": f"expected bool, got {value!r}",
            "string_type": f"expected str, got {value!r}",
            "tuple_type": f"expected a list, got {value!r}",
            "list_type": f"expected a list, got {value!r}",
            "model_type": f"expected a mapping, got {value!r}",
            "dataclass_type": f"expected a mapping, got {value!r}",
            "dict_type": f"expected a mapping, got {value!r}",
        }.get(err["type"], str(err["msg"]).removeprefix("Value error, "))
        lines.append(f"{where}: {message}")
    for loc, keys in unknown.items():
        known = sorted(_field_names(_type_at(cls, loc)))
        lines.insert(0, f"{_dotted(loc) or cls.__name__}: unknown key(s) {sorted(keys)}; known: {known}")
    return "\n".join(lines)


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc).replace(".[", "[")


def _is_config(value: Any) -> bool:
    return isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def _field_names(kind: Any) -> set[str]:
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return set(kind.model_fields)
    if dataclasses.is_dataclass(kind):
        return {f.name for f in dataclasses.fields(kind)}
    return set()


def _type_at(cls: type[Config], loc: tuple[Any, ...]) -> Any:
    """The config class at the field path ``loc`` below ``cls`` (a nested block's)."""
    kind: Any = cls
    for part in loc:
        kind = type(getattr(kind(), str(part)))
    return kind
