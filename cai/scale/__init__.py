"""Scaling cai out: the same run on a Ray cluster (``cai run CONFIG --ray-address ADDRESS``).

``run_pipeline_ray`` (in ``cai.scale.ray_run``) writes what ``cai.pipeline.run_pipeline`` writes,
row for row; Ray is imported only when it is called (``pip install 'cai[ray]'``).
"""

from __future__ import annotations

from .ray_run import RAY_HINT, run_pipeline_ray

__all__ = ["RAY_HINT", "run_pipeline_ray"]
