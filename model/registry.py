"""A folder of versioned models, laid out like Triton's model repository.

    registry/
      <name>/
        aliases.json              {"production": "3", ...}
        <version>/
          model.safetensors       all weights: "unet.*" and "autoencoder.*" (no pickles)
          config.json             ModelConfig: architecture, diffusion, provenance
          metrics.json            optional evaluation results
          MODEL_CARD.md           optional

References: ``name`` (alias ``production`` if set, else the highest version), ``name:version``
or ``name@alias``. Names, versions and aliases are restricted to a safe character set so no
reference can reach outside the registry folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError, InvalidModelRef, ModelNotFound

DEFAULT_ALIAS = "production"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
ALIASES_FILE = "aliases.json"

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REF = re.compile(r"^(?P<name>[^:@]+)(?::(?P<version>[^:@]+)|@(?P<alias>[^:@]+))?$")


def default_registry_root() -> Path:
    """``$VPDSR_REGISTRY`` if set, else ``./registry``."""
    return Path(os.environ.get("VPDSR_REGISTRY", "registry"))


def _check_part(kind: str, value: str) -> str:
    if not _PART.match(value) or ".." in value:
        raise InvalidModelRef(f"invalid model {kind} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _version_key(version: str) -> tuple[int, Any]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "ModelRef":
        match = _REF.match(ref.strip())
        if not match:
            raise InvalidModelRef(f"invalid model reference {ref!r}: use name, name:version or name@alias")
        name = _check_part("name", match["name"])
        version = match["version"] and _check_part("version", match["version"])
        alias = match["alias"] and _check_part("alias", match["alias"])
        return cls(name, version or None, alias or None)


@dataclass(frozen=True)
class RegistryEntry:
    """One resolved model version on disk."""

    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(json.loads((self.path / CONFIG_FILE).read_text()))

    def metrics(self) -> dict[str, Any]:
        path = self.path / METRICS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(unet, autoencoder) state dicts, split from the single weights file."""
        weights = load_file(self.path / WEIGHTS_FILE)
        parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "autoencoder": {}}
        for key, tensor in weights.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise CheckpointError(f"{self.ref}: unexpected weight {key!r} in {WEIGHTS_FILE}")
            parts[prefix][rest] = tensor
        return parts["unet"], parts["autoencoder"]


class Registry:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry_root()

    def aliases(self, name: str) -> dict[str, str]:
        path = self.root / _check_part("name", name) / ALIASES_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def versions(self, name: str) -> list[str]:
        folder = self.root / _check_part("name", name)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file() and _PART.match(p.name)]
        return sorted(found, key=_version_key)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _PART.match(p.name) and self.versions(p.name))

    def resolve(self, ref: str | ModelRef) -> RegistryEntry:
        """Turn a reference into an existing version folder, or raise ModelNotFound."""
        parsed = ModelRef.parse(ref) if isinstance(ref, str) else ref
        versions = self.versions(parsed.name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown model {parsed.name!r} (known: {known})")  # no path: servers show this
        aliases = self.aliases(parsed.name)
        if parsed.alias is not None:
            if parsed.alias not in aliases:
                raise ModelNotFound(f"model {parsed.name!r} has no alias {parsed.alias!r} (aliases: {sorted(aliases)})")
            version = aliases[parsed.alias]
        else:
            version = parsed.version or aliases.get(DEFAULT_ALIAS) or versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model {parsed.name!r} has no version {version!r} (versions: {versions})")
        return RegistryEntry(parsed.name, version, self.root / parsed.name / version)

    def list(self) -> list[dict[str, Any]]:
        """Everything in the registry, for `vpdsr registry list` and `GET /v1/models`."""
        out = []
        for name in self.names():
            aliases = self.aliases(name)
            for version in self.versions(name):
                entry = RegistryEntry(name, version, self.root / name / version)
                cfg = entry.config()
                out.append(
                    {
                        "name": name,
                        "version": version,
                        "aliases": sorted(a for a, v in aliases.items() if v == version),
                        "kind": cfg.kind,
                        "inference_steps": cfg.inference_steps,
                        "max_steps": cfg.diffusion.steps,
                        "metrics": entry.metrics(),
                    }
                )
        return out

    def save(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        unet: dict[str, torch.Tensor],
        autoencoder: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
        metrics: dict[str, Any] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> RegistryEntry:
        """Write a new version (floating-point weights optionally cast to ``dtype`` for size)."""
        folder = self.root / _check_part("name", name) / _check_part("version", version)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {}
        for prefix, state in (("unet", unet), ("autoencoder", autoencoder)):
            for key, tensor in state.items():
                t = tensor.detach().cpu()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                weights[f"{prefix}.{key}"] = t.contiguous()
        save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt", "model": f"{name}:{version}"})
        (folder / CONFIG_FILE).write_text(config.to_json() + "\n")
        if metrics is not None:
            self.write_metrics(RegistryEntry(name, version, folder), metrics)
        for alias in aliases:
            self.set_alias(name, alias, version)
        return RegistryEntry(name, version, folder)

    def write_metrics(self, entry: RegistryEntry, metrics: dict[str, Any]) -> None:
        (entry.path / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        _check_part("alias", alias)
        if version not in self.versions(name):
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        aliases = self.aliases(name) | {alias: version}
        (self.root / name / ALIASES_FILE).write_text(json.dumps(aliases, indent=2, sort_keys=True) + "\n")

    def next_version(self, name: str) -> str:
        numeric = [int(v) for v in self.versions(name) if v.isdigit()]
        return str(max(numeric, default=0) + 1)
