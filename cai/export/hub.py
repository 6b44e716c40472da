"""Write an export folder (data files + card), check it reads back as the Hub would, push it.

The folder is built and checked beside its target and pushed only when complete, in one
commit, so the Hub never holds half an export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import HfApi

from ..errors import CaiError, ExportError, InputError
from .build import CARD_MARK, FORMATS, KINDS, Export
from .card import render_card


def configs(splits: Sequence[str], fmt: str) -> list[dict[str, Any]]:
    """The card's `configs`: `sft` (default when present) and `prefs`, each with its files."""
    out: list[dict[str, Any]] = []
    for kind in KINDS:
        files = [{"split": s, "path": f"data/{s}.{fmt}"} for s in splits if s.endswith("_" + kind)]
        if files:
            out.append({"config_name": kind, "data_files": files})
    if out:
        out[0]["default"] = True
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()


def write_folder(export: Export, folder: Path, fmt: str = "parquet", *, license: str | None = None,
                 repo_id: str | None = None, secrets: Sequence[str] = ()) -> None:
    """Write data files and the card into an empty ``folder``, then read them back to check."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with _quiet():
        for split, ds in export.dataset.items():
            path = folder / "data" / f"{split}.{fmt}"
            if fmt == "parquet":
                ds.to_parquet(str(path))
            else:
                ds.to_json(str(path), lines=True, force_ascii=False)
    card = render_card(export, configs(list(export.dataset), fmt), license=license, repo_id=repo_id)
    if any(s and s in card for s in secrets):
        raise ExportError("the dataset card would hold your Hugging Face token; not written")
    (folder / "README.md").write_text(card, encoding="utf-8")
    verify_folder(folder, export)


def verify_folder(folder: Path, export: Export) -> None:
    """Load the folder as the Hub would (card `configs` -> files) and compare with the export."""
    from huggingface_hub import DatasetCard

    meta = DatasetCard.load(folder / "README.md").data.to_dict()
    seen: list[str] = []
    with _quiet(), tempfile.TemporaryDirectory() as cache:
        for c in meta.get("configs", []):
            got = datasets.load_dataset(str(folder.resolve()), c["config_name"], cache_dir=cache)
            for split, ds in got.items():
                want = export.dataset[split]
                if ds.num_rows != want.num_rows or ds.column_names != want.column_names:
                    raise ExportError(f"{folder}: {split} reads back as {ds.num_rows} rows "
                                      f"{ds.column_names}, expected {want.num_rows} "
                                      f"{want.column_names}")
                seen.append(split)
    if sorted(seen) != sorted(export.dataset):
        raise ExportError(f"{folder}: the card's configs list {seen}, not every split")


def _is_export(folder: Path) -> bool:
    readme = folder / "README.md"
    return readme.is_file() and CARD_MARK in readme.read_text(encoding="utf-8", errors="replace")


def save(export: Export, out: Path, fmt: str = "parquet", *, license: str | None = None,
         repo_id: str | None = None, secrets: Sequence[str] = ()) -> Path:
    """Write the export to ``out`` (replacing an earlier cai export there, never other files)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_export(out))):
        raise InputError(f"{out}: exists and is not an earlier cai export; choose another "
                         "--out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_folder(export, tmp, fmt, license=license, repo_id=repo_id, secrets=secrets)
        old = tmp.with_name(tmp.name + ".old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_token(token: str | None) -> str:
    """``--token``, else HF_TOKEN, else the token saved by `hf auth login`."""
    from huggingface_hub import get_token

    tok = token or get_token()
    if not tok:
        raise InputError("no Hugging Face token: pass --token, set HF_TOKEN, or run "
                         "`hf auth login` (a token with write access)")
    return tok


def push(folder: Path, repo_id: str, *, token: str, private: bool = True,
         api: Any = None) -> str:
    """Upload a written, checked export folder to a dataset repo in one commit."""
    folder = Path(folder)
    if not _is_export(folder) or not (folder / "data").is_dir():
        raise ExportError(f"{folder}: not a complete cai export; nothing pushed")
    api = api if api is not None else HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if private and not getattr(api.repo_info(repo_id, repo_type="dataset"), "private", True):
            raise ExportError(f"{repo_id} exists and is public, but --private was asked; nothing "
                              "pushed (make it private on the Hub, or pass --public)")
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
            commit_message="cai export", delete_patterns=["data/*"])
    except CaiError:
        raise
    except Exception as e:  # network, auth, permissions: one line, the token never shown
        msg = str(e).replace(token, "<token>").splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"push to {repo_id} failed: {msg} (the export is complete in "
                          f"{folder}; run the command again to retry)") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/datasets/{repo_id}")
