"""Export a run folder as TRL-ready datasets: ``build`` reads it, ``save`` writes and checks the
folder (data files + dataset card), ``push`` uploads it to the Hub in one commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..constitution import Constitution, load_constitution
from ..errors import InputError
from .build import BEST_OF_N, LABELS_FILE, MANIFEST, PREFS_FILE, SFT_FILE, Export, RunInfo, build
from .hub import push, resolve_token, save


@dataclass
class Exported:
    folder: Path
    splits: dict[str, int]  # split -> rows
    url: str | None = None  # the Hub commit, when pushed
    warnings: list[str] = field(default_factory=list)  # one line each, for the command to print


def export_run(run_dir: Path, out: Path, *, fmt: str = "parquet", test_fraction: float = 0.1, seed: int = 0,
               full: bool = False, constitutions: Sequence[Path] = (), license: str | None = None,
               push_to_hub: str | None = None, private: bool = True, token: str | None = None,
               include_rejects: bool = False, score: str = "raw", labels: str = "human-first") -> Exported:
    """`cai export`: build the run's datasets, write and check the folder, push it if asked.
    ``constitutions`` (files) describe a run folder without run.json; each must be one the rows
    record by hash."""
    tok = resolve_token(token) if push_to_hub else None
    secrets = [tok] if tok else []
    dumps = [load_constitution(f).model_dump(mode="json") for f in constitutions]
    ex = build(run_dir, test_fraction=test_fraction, seed=seed, full=full, constitutions=dumps, secrets=secrets,
               include_rejects=include_rejects, score=score, labels=labels)
    used = {h for hs in ex.info.hashes.values() for h in hs}
    for f, d in zip(constitutions, dumps, strict=True):
        h = Constitution.model_validate(d).digest()
        if used and h not in used:
            raise InputError(f"{f}: is not the constitution this run used (hash {h[:12]}, the rows "
                             f"record {', '.join(sorted(x[:12] for x in used))})")
    target = save(ex, out, fmt, license=license, repo_id=push_to_hub, secrets=secrets)
    res = Exported(target, {k: v.num_rows for k, v in ex.dataset.items()}, warnings=no_prefs_warning(ex))
    if push_to_hub and tok:
        res.url = push(target, push_to_hub, token=tok, private=private)
    return res


def no_prefs_warning(ex: Export) -> list[str]:
    """A line when the export holds no preference split, saying why."""
    if any(k.endswith("_prefs") for k in ex.dataset):
        return []
    folder = ex.info.folder
    if (folder / BEST_OF_N["prefs"]).exists() and not (folder / PREFS_FILE).exists():
        return [f"no preference split: {BEST_OF_N['prefs']} holds no pairs (every best tied its worst, or a "
                "gate kept it out: see rejects.jsonl)"]
    if not (folder / PREFS_FILE).exists():
        return [f"no preference split: {folder} has no {PREFS_FILE} (label pairs with `cai run` or `cai label`)"]
    labels = folder / LABELS_FILE
    judged = sum(bool(x.strip()) for x in labels.read_text(encoding="utf-8").splitlines()) if labels.exists() else 0
    return [f"no preference split: {PREFS_FILE} holds no pairs ({judged} judged in {LABELS_FILE}: ties or gated "
            "pairs are left out; see labels.jsonl and rejects.jsonl)"]


__all__ = ["LABELS_FILE", "MANIFEST", "PREFS_FILE", "SFT_FILE", "Export", "Exported", "RunInfo", "build",
           "export_run", "no_prefs_warning", "push", "resolve_token", "save"]
