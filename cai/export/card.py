"""The dataset card (README.md) of an export: YAML metadata, then what a reader needs to trust
the data: the constitution in full, the models, the judge settings, counts and diagnostics."""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import jinja2
import yaml

from .. import __version__
from ..analysis import build_report
from ..constitution import Constitution
from ..errors import CaiError
from ..hashing import sha256_json
from ..review.agreement import review_diagnostics
from .build import CARD_MARK, LABELS_FILE, TRACE, Export, RunInfo, scrub

JUDGE_LABELS = {
    "mode": "label mode (logprobs, choice, or cot = chain of thought before the answer)",
    "principles": "ensemble size (principles judged per pair; the label is their mean)",
    "both_orders": "orders (true: each pair judged as A/B and B/A, averaged)",
    "clamp": "clamp of CoT probabilities",
    "tie_threshold": "tie threshold (|p - 0.5| below it is a tie)",
    "min_mass": "abstain below this option probability mass",
    "top_logprobs": "top log-probs read",
    "fallback": "ask again as a structured choice when no log-probs",
    "cot": "CoT sampling",
}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratio(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.1%})" if n else "n/a"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, ensure_ascii=False) + "`"
    return "n/a" if v is None else str(v)


def export_rows(dd: Any) -> dict[str, list[dict[str, Any]]]:
    """The exported rows by kind (``sft``, ``prefs``), train and test together."""
    return {kind: [r for split, ds in dd.items() if split.endswith("_" + kind) for r in ds.to_list()]
            for kind in ("sft", "prefs")}


def diagnostics(rows: dict[str, list[dict[str, Any]]], info: RunInfo) -> dict[str, dict[str, Any]]:
    """Counts and rates a reader should see before training on the data."""
    d: dict[str, dict[str, Any]] = {}
    if rows.get("sft"):
        rs = rows["sft"]
        final = [r["messages"][-1]["content"] for r in rs]
        ini = [r["initial_response"] for r in rs if r["initial_response"] is not None]
        d["sft"] = {
            "rows": len(rs), "prompts": info.prompts.get("sft", 0),
            "mean revision rounds": _mean([len(r["principle_ids"]) for r in rs]),
            "rows changed by revision": sum(
                r["initial_response"] not in (None, r["messages"][-1]["content"]) for r in rs),
            "mean chars, initial answer": _mean([len(x) for x in ini]),
            "mean chars, final revision": _mean([len(x) for x in final]),
        }
    if rows.get("prefs"):
        rs = rows["prefs"]
        known = [r["position_consistent"] for r in rs if r["position_consistent"] is not None]
        ch = [len(r["chosen"][-1]["content"]) for r in rs]
        rj = [len(r["rejected"][-1]["content"]) for r in rs]
        d["prefs"] = {
            "pairs": len(rs), "prompts": info.prompts.get("prefs", 0),
            "position consistent (both orders prefer the same)": _ratio(sum(known), len(known)),
            "ties kept in the pairs": sum(r["tie"] for r in rs),
            "mean p_chosen": _mean([r["p_chosen"] for r in rs if r["p_chosen"] is not None]),
            "mean chars, chosen": _mean(ch), "mean chars, rejected": _mean(rj),
            "chosen longer than rejected": _ratio(sum(c > r for c, r in zip(ch, rj, strict=True)),
                                                  len(rs)),
            "label modes": dict(Counter(r["label_mode"] or "n/a" for r in rs)),
        }
    labels = info.folder / LABELS_FILE
    if labels.exists():
        n = ties = abst = judged = agree = with_human = 0
        consistent: list[bool] = []
        with labels.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                n += 1
                ties += bool(r.get("tie"))
                if isinstance(r.get("position_consistent"), bool):
                    consistent.append(r["position_consistent"])
                abst += int(r.get("abstentions") or 0)
                judged += len(r.get("judgements") or [])
                if r.get("human") in ("a", "b") and r.get("label") in ("a", "b"):
                    with_human += 1
                    agree += r["human"] == r["label"]
        d["labels"] = {"judged pairs (labels.jsonl)": n, "ties (held out of the pairs)": ties,
                       "abstained judgements": f"{abst}/{judged}",
                       "position consistent, all judged pairs":
                           _ratio(sum(consistent), len(consistent))}
        if with_human:
            d["labels"]["agreement with human labels"] = _ratio(agree, with_human)
    d |= review_diagnostics(info.folder, rows.get("prefs") or [])
    if info.failures:
        d["failures"] = dict(info.failures)
    gates = (info.manifest or {}).get("gates")
    if isinstance(gates, dict) or info.rejected:
        d["quality gates (rejects.jsonl)"] = {**(gates if isinstance(gates, dict) else {}),
                                              **{f"{k} rows left out of this export": v
                                                 for k, v in info.rejected.items()}}
    if info.manifest and isinstance(info.manifest.get("counts"), dict):
        d["run.json counts"] = _dotted(info.manifest["counts"])
    return d


def _dotted(counts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested counts as one level of dotted names: ``preferences.judged_by.logprobs``."""
    out: dict[str, Any] = {}
    for k, v in counts.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _judge_summary(j: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what a label means (``JudgeConfig.to_dict()``, as rows and
    run.json record them)."""
    orders = ["ab", "ba"] if j.get("both_orders") else ["ab"]
    cot = j.get("mode") == "cot"
    return {
        "orders": " and ".join(orders) + (" (averaged: position-bias control)" if len(orders) > 1 else ""),
        "ensemble size (principles per pair)": j.get("principles"),
        "chain of thought": cot,
        "clamp": j.get("clamp") if cot else f"{_fmt(j.get('clamp'))} (applies to CoT only)",
        "tie threshold": j.get("tie_threshold"),
    }


def _digest(dump: dict[str, Any]) -> str:
    try:
        return Constitution.model_validate(dump).digest()
    except Exception:
        return sha256_json(dump)


def _size(n: int) -> str:
    for cap, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                       (1_000_000, "100K<n<1M")):
        if n < cap:
            return label
    return "1M<n<10M"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=_fmt, cell=lambda t: str(t).replace("|", "\\|").replace("\n", " "),
                       yaml=lambda d: yaml.safe_dump(scrub(d), sort_keys=False, allow_unicode=True, width=100).rstrip(),
                       tojson_indent=lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str))
    return env.from_string(files(__package__).joinpath("card.md.j2").read_text(encoding="utf-8"))


def _constitutions(info: RunInfo) -> list[tuple[str, dict[str, Any] | None, str]]:
    """(hash, full dump or None, the stages that used it) per constitution the run knows."""
    used = {h: sorted(k for k, hs in info.hashes.items() if h in hs) for hs in info.hashes.values() for h in hs}
    dumps = {_digest(d): d for d in info.constitutions}
    return [(h, dumps.get(h), ", ".join(used.get(h, [])) or "no row records this hash")
            for h in sorted(set(used) | set(dumps))]


def render_card(export: Export, configs: list[dict[str, Any]], *, license: str = "unknown",
                repo_id: str | None = None) -> str:
    info, dd = export.info, export.dataset
    m = scrub(info.manifest or {})
    prov = {k: scrub(v) for k, v in info.provenance.items()}
    cname = next((d.get("name") for d in info.constitutions if d.get("name")), None) or next(
        (p.get("constitution") for p in prov.values() if p.get("constitution")), "constitution")
    meta = {
        "pretty_name": f"{cname}: Constitutional AI data (cai)", "license": license,
        "task_categories": ["text-generation"],
        "tags": ["constitutional-ai", "rlaif", "synthetic", "trl", "sft", "dpo", "cai"],
        "size_categories": [_size(sum(ds.num_rows for ds in dd.values()))],
        "configs": configs,
    }
    judge = m.get("judge") or prov.get("prefs", {}).get("judge")
    try:
        headline, error = build_report(info.folder)["headline"], None
    except CaiError as e:
        headline, error = {}, e
    page = _template().render(
        meta=meta, meta_yaml=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), mark=CARD_MARK,
        version=__version__, repo=repo_id or "<repo_id>", info=info, trace=TRACE,
        splits=[(c["config_name"], f["split"], dd[f["split"]].num_rows, len(set(dd[f["split"]]["prompt_id"])))
                for c in configs for f in c["data_files"]],
        models=m.get("models") or {k: p.get("model") for k, p in prov.items()},
        judge=judge, judge_summary=_judge_summary(judge) if isinstance(judge, dict) else {},
        judge_rows={f"`{k}`" + (f": {JUDGE_LABELS[k]}" if k in JUDGE_LABELS else ""): v
                    for k, v in judge.items()} if isinstance(judge, dict) else {},
        revise=m.get("revise") or prov.get("sft", {}).get("config"),
        diagnostics=diagnostics(export_rows(dd), info),
        report_error=error, report_html=(info.folder / "report.html").exists(),
        headline={k: v for k, v in headline.items() if v is not None}, constitutions=_constitutions(info),
        rest={k: v for k, v in m.items() if k not in ("constitution", "judge", "models", "counts", "revise")})
    return page.rstrip() + "\n"
