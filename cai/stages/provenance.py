"""What a stage's rows record of how they were made: its settings as a dict, and their provenance."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .. import __version__
from ..constitution import Constitution
from ..templates import Templates
from ..types import Sampling


class StageConfig:
    """A stage's settings (a frozen dataclass): ``to_dict`` is their record in fingerprints and
    provenance, the fields in order, a ``Sampling`` as its ``to_dict`` and a tuple as a list."""

    def to_dict(self) -> dict[str, Any]:
        values = ((f.name, getattr(self, f.name)) for f in fields(self))  # type: ignore[arg-type]
        return {k: v.to_dict() if isinstance(v, Sampling) else list(v) if isinstance(v, tuple) else v
                for k, v in values}


def stage_provenance(stage: str, model_id: str, constitution: Constitution, templates: Templates,
                     template_stages: tuple[str, ...], **settings: Any) -> dict[str, Any]:
    """A stage's rows' ``provenance``: cai, the model, the constitution, the templates, then ``settings``."""
    return {"stage": stage, "cai_version": __version__, "model": model_id, "constitution": constitution.name,
            "constitution_version": constitution.version, "constitution_hash": constitution.digest(),
            "templates_hash": templates.digest(template_stages), **settings}
