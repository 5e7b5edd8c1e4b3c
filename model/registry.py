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

The command line also reads the registry shipped with the package (the repository's
``registry/``, beside the installed packages of a clone or an editable install) after the
user's own, so that the shipped model is found from any folder; writes go to the user's only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import CheckpointError, InvalidModelRef, ModelNotFound

if TYPE_CHECKING:  # torch is imported where weights are read or written: `vpdsr --help` must not wait for it
    import torch

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


def shipped_registry_root() -> Path | None:
    """The ``registry/`` folder of the source tree these packages run from (a clone, installed
    editable as the README says), or None when they were installed elsewhere (a wheel: the
    container image bakes its registry in at ``$VPDSR_REGISTRY`` instead)."""
    tree = Path(__file__).resolve().parent.parent
    shipped = tree / "registry"
    return shipped if (tree / "pyproject.toml").is_file() and shipped.is_dir() else None


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
        from safetensors.torch import load_file

        weights = load_file(self.path / WEIGHTS_FILE)
        parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "autoencoder": {}}
        for key, tensor in weights.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise CheckpointError(f"{self.ref}: unexpected weight {key!r} in {WEIGHTS_FILE}")
            parts[prefix][rest] = tensor
        return parts["unet"], parts["autoencoder"]


def _versions_in(folder: Path) -> list[str]:
    """The versions in one model's folder, in order (none when it does not exist)."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file() and _PART.match(p.name)]
    return sorted(found, key=_version_key)


def _aliases_in(folder: Path) -> dict[str, str]:
    path = folder / ALIASES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class Registry:
    """Models in ``root`` (default: :func:`default_registry_root`). With ``shipped``, reads fall back
    to :func:`shipped_registry_root`: a model is taken whole from the first folder that has it."""

    def __init__(self, root: str | Path | None = None, *, shipped: bool = False) -> None:
        self.root = Path(root) if root is not None else default_registry_root()
        fallback = shipped_registry_root() if shipped else None
        same = fallback is None or (self.root.is_dir() and self.root.resolve() == fallback)
        self.roots: tuple[Path, ...] = (self.root,) if same else (self.root, fallback)

    def _folder(self, name: str) -> Path:
        """The folder of model ``name``: in the first root that has a version of it."""
        _check_part("name", name)
        return next((root / name for root in self.roots if _versions_in(root / name)), self.root / name)

    def aliases(self, name: str) -> dict[str, str]:
        return _aliases_in(self._folder(name))

    def versions(self, name: str) -> list[str]:
        return _versions_in(self._folder(name))

    def names(self) -> list[str]:
        found = {p.name for root in self.roots if root.is_dir() for p in root.iterdir() if _PART.match(p.name)}
        return sorted(name for name in found if self.versions(name))

    def resolve(self, ref: str | ModelRef) -> RegistryEntry:
        """Turn a reference into an existing version folder, or raise ModelNotFound."""
        parsed = ModelRef.parse(ref) if isinstance(ref, str) else ref
        folder = self._folder(parsed.name)
        versions = _versions_in(folder)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown model {parsed.name!r} (known: {known})", self.roots)
        aliases = self.aliases(parsed.name)
        if parsed.alias is not None:
            if parsed.alias not in aliases:
                raise ModelNotFound(f"model {parsed.name!r} has no alias {parsed.alias!r} (aliases: {sorted(aliases)})",
                                    (folder.parent,))
            version = aliases[parsed.alias]
        else:
            version = parsed.version or aliases.get(DEFAULT_ALIAS) or versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model {parsed.name!r} has no version {version!r} (versions: {versions})",
                                (folder.parent,))
        return RegistryEntry(parsed.name, version, folder / version)

    def list(self) -> list[dict[str, Any]]:
        """Everything in the registry, for `vpdsr registry list` and `GET /v1/models`."""
        out = []
        for name in self.names():
            aliases = self.aliases(name)
            folder = self._folder(name)
            for version in self.versions(name):
                entry = RegistryEntry(name, version, folder / version)
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
        """Write a new version into ``root`` (floating-point weights optionally cast to ``dtype`` for size)."""
        from safetensors.torch import save_file

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
        """Point ``alias`` of a model in ``root`` at ``version``."""
        _check_part("alias", alias)
        folder = self.root / _check_part("name", name)
        if version not in _versions_in(folder):
            raise ModelNotFound(f"model {name!r} has no version {version!r}", (self.root,))
        aliases = _aliases_in(folder) | {alias: version}
        (folder / ALIASES_FILE).write_text(json.dumps(aliases, indent=2, sort_keys=True) + "\n")

    def next_version(self, name: str) -> str:
        """The next free number in ``root``."""
        numeric = [int(v) for v in _versions_in(self.root / _check_part("name", name)) if v.isdigit()]
        return str(max(numeric, default=0) + 1)
