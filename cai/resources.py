"""Where the shipped data lives: ``cai/_data`` in a wheel, the repository root in a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """Path of a shipped data file or folder (``prompts``, ``principles.yaml``, ``constitution``)."""
    wheel = _PKG / "_data" / name
    if wheel.exists():
        return wheel
    return _PKG.parent / name
