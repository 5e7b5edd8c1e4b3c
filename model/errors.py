"""Exceptions that callers (CLI, HTTP service) turn into clear user-facing messages."""

from pathlib import Path


class VPDSRError(Exception):
    """Base class: a problem the user can fix (bad reference, missing file, wrong checkpoint)."""


class InvalidModelRef(VPDSRError):
    """A model reference that is malformed or could escape the registry folder."""


class ModelNotFound(VPDSRError):
    """A well-formed reference that names no model, version or alias in the registry.

    The message names no folder (servers show it to clients); ``searched`` holds the registry
    folders that were looked in, for the command line to show."""

    def __init__(self, message: str, searched: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.searched = searched


class CheckpointError(VPDSRError):
    """A weights file that is missing, unreadable, or does not fit the architecture."""


class InvalidRequest(VPDSRError):
    """Inference options that the model cannot honour (steps out of range, bad tile size)."""
