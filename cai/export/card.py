"""The dataset card (README.md) of an export: YAML metadata, then what a reader needs to trust
the data: where the prompts came from and their licence, the models, each setting once (with
what it means), what the data cost over the run's whole history, diagnostics, the report's
figures by name, and the constitution in full. Paths are relative to the run folder."""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections import Counter
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import jinja2
import yaml

from .. import __version__
from ..analysis import build_report
from ..analysis.read import as_dict
from ..constitution import Constitution
from ..errors import CaiError
from ..files import iter_jsonl
from ..hashing import sha256_json
from ..review.agreement import review_diagnostics
from .build import CARD_MARK, KINDS, LABELS_FILE, TRACE, Export, RunInfo, portable, scrub

# The judge's settings (``JudgeConfig.to_dict()``): a name and what it means, in table order.
JUDGE_SETTINGS = {
    "mode": ("label mode", "logprobs: the judge's probabilities of the letters A and B; choice: a structured "
             "choice; cot: a chain of thought, then the answer"),
    "principles": ("principles per pair", "constitution principles judged per pair; the label is their mean"),
    "both_orders": ("both orders", "each pair judged as A/B and as B/A, averaged (controls position bias)"),
    "tie_threshold": ("tie threshold", "a pair whose label is this close to 0.5 is a tie, left out of the pairs"),
    "top_logprobs": ("top log-probs read", "how many of the judge's most likely next tokens are read"),
    "min_mass": ("abstain below", "a judgement abstains when A and B together get less probability"),
    "fallback": ("structured-choice fallback", "ask again as a structured choice when no log-probs come back"),
    "seed": ("seed", "sampling seed"),
}
# The label stage's settings that are not the judge's (run.json ``config.label``).
PAIR_SETTINGS = {
    "sources": ("pair sources", "revisions: first answer vs final revision; sample: two sampled answers; "
                "dataset: the given pairs"),
    "pairs": ("pairs file", "the given pairs (source dataset)"),
    "samples": ("samples per prompt", "answers sampled per prompt for the sample source"),
    "sample_temperature": ("sample temperature", "temperature of those samples"),
    "keep_ties": ("ties kept", "whether tied pairs stay in the preference split"),
    "debias_length": ("length-debiased label", "whether a label with the length effect regressed out is "
                      "written beside the raw one"),
}
COT_SETTINGS = {"clamp": ("CoT clamp", "chain-of-thought labels are clamped to this range"),
                "cot": ("CoT sampling", "how the chain of thought is sampled")}
# The report's headline figures (``cai.analysis``): a name and one line on what each means.
FIGURES = {
    "rows_revised": ("rows revised", "rows in revisions.jsonl"),
    "pairs_labelled": ("pairs judged", "rows in labels.jsonl"),
    "failures": ("failed rows", "rows in the *.failures.jsonl files (a call failed or its answer was unreadable)"),
    "revision_win_rate": ("revision preferred", "share of revision pairs whose label is the revised answer "
                          "(a tie counts as not preferred)"),
    "revision_win_rate_length_controlled": ("revision preferred at equal length", "the same, predicted for "
                                            "answers of equal length (logistic regression on the length difference)"),
    "mean_p_revision": ("mean p(revision)", "mean probability the judge gives the revised answer"),
    "mean_p_a": ("mean p(A)", "mean probability of the answer stored as A"),
    "tie_rate": ("ties", "share of pairs whose label is within the tie threshold of 0.5"),
    "abstention_rate": ("abstentions", "share of judgements with no A or B among the top log-probs"),
    "position_consistency": ("position consistency", "share of pairs whose A/B and B/A orders prefer the "
                             "same answer"),
    "first_slot_rate": ("first-slot preference", "share of judgements preferring the answer shown first "
                        "(0.5: no position bias)"),
    "longer_chosen": ("longer answer chosen", "share of decided pairs whose chosen answer is the longer"),
    "length_pearson": ("length correlation", "Pearson r of the length difference with the label (0: none)"),
    "length_growth": ("length growth", "mean length of the final revisions / mean length of the first answers"),
    "length_growth_median_ratio": ("median per-row length ratio", "median over rows of final length / first "
                                   "length"),
    "human_pairs": ("human-labelled pairs", "pairs that carry a person's label"),
    "human_agreement": ("agreement with people", "share of decided human-labelled pairs where the judge's "
                        "label is the person's"),
    "human_coverage": ("decided share", "share of human-labelled pairs the judge decided (not a tie)"),
    "best_of_n_rows": ("best-of-n rows", "prompts whose n answers the judge ranked (best_of_n.jsonl)"),
    "best_of_n_pairs": ("best-vs-worst pairs", "pairs in best_of_n.pairs.jsonl (margin > 0, not gated)"),
    "best_of_n_mean_margin": ("mean best-of-n margin", "the best answer's soft win rate minus the worst's"),
    "brier": ("Brier score", "mean (p(A) - person chose A)^2; 0 is perfect, 0.25 is a coin"),
    "ece": ("calibration error (ECE)", "gap between the judge's probability and how often people agree, "
            "10 bins"),
}
RATES = {"revision_win_rate", "revision_win_rate_length_controlled", "tie_rate", "abstention_rate",
         "position_consistency", "first_slot_rate", "longer_chosen", "human_agreement", "human_coverage"}
# Prompt sources cai ships or knows: where they come from and their licence (a Hub license id).
KNOWN_SOURCES = {
    "hh_red_team.jsonl": ("the harmlessness test split of Anthropic's HH-RLHF data (github.com/anthropics/hh-rlhf, "
                          "`harmless-base/test.jsonl.gz`), as shipped in cai's examples/", "mit"),
    "Anthropic/hh-rlhf": ("Anthropic's HH-RLHF data on the Hub", "mit"),
}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratio(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.1%})" if n else "n/a"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
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
    if (labels := info.folder / LABELS_FILE).exists():
        n = ties = abst = judged = agree = with_human = 0
        consistent: list[bool] = []
        for r in iter_jsonl(labels):  # streamed: the judgements make this file the run's largest
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
                       "position consistent, all judged pairs": _ratio(sum(consistent), len(consistent))}
        if with_human:
            d["labels"]["agreement with human labels"] = _ratio(agree, with_human)
    if bon := info.best_of_n:  # where the rows came from: best of n (cai.stages.best_of_n)
        d["best of n"] = {"SFT rows: the best of n answers (best_of_n.jsonl)": bon.get("sft", 0),
                          "pairs: best vs worst (best_of_n.pairs.jsonl)": bon.get("prefs", 0),
                          "answers per prompt": ", ".join(map(str, bon["samples"])),
                          "ranking": ", ".join(bon["methods"]),
                          "mean margin (best's soft win rate - worst's)": _mean(bon["margins"])}
    d |= review_diagnostics(info.folder, rows.get("prefs") or [])
    if info.failures:
        d["failures"] = dict(info.failures)
    gates = (info.manifest or {}).get("gates")
    if isinstance(gates, dict) or info.rejected:
        d["quality gates (rejects.jsonl)"] = {**(gates if isinstance(gates, dict) else {}),
                                              **{f"{k} rows left out of this export": v
                                                 for k, v in info.rejected.items()}}
    return d


def cost(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the data cost in all: calls and rows summed over every run in run.json's history
    (an older run.json without one: its last run)."""
    runs = [h for h in manifest.get("history") or [] if isinstance(h, dict)] or [manifest]
    total: Counter[str] = Counter()
    for h in runs:
        calls, counts = as_dict(h.get("calls")), as_dict(h.get("counts"))
        total.update({k: int(v) for k, v in calls.items() if isinstance(v, int)})
        for stage in ("revise", "label"):
            c = as_dict(counts.get(stage))
            total.update({f"{stage}.{k}": int(v) for k, v in c.items() if isinstance(v, int)})
        if isinstance(h.get("elapsed_s"), int | float):
            total["seconds"] += h["elapsed_s"]
    names = {"sent": "model calls sent", "cached": "calls answered from the cache", "errors": "calls that failed",
             "revise.written": "revision rows written", "revise.failed": "revision rows failed",
             "label.written": "pairs judged", "label.failed": "pairs that failed to judge",
             "seconds": "time (seconds)"}
    return {"runs of `cai run`": len(runs), **{name: round(total[k], 1) if k == "seconds" else total[k]
                                              for k, name in names.items() if k in total},
            **tokens(as_dict(manifest.get("usage")), as_dict(manifest.get("cost")))}


def tokens(usage: dict[str, Any], priced: dict[str, Any]) -> dict[str, Any]:
    """The card's rows of run.json's ``usage`` (tokens served, by stage) and ``cost``."""
    if not usage:
        return {}
    rows: dict[str, Any] = {"prompt tokens served": usage.get("prompt_tokens"),
                            "of which from the server's prefix cache": usage.get("cached_prompt_tokens"),
                            "completion tokens served": usage.get("completion_tokens")}
    for stage, u in as_dict(usage.get("by_stage")).items():
        u = as_dict(u)
        rows[f"tokens in / out: {stage}"] = f"{u.get('prompt_tokens', 0)} / {u.get('completion_tokens', 0)}"
    if rejected := as_dict(usage.get("rejected")):
        rows["tokens of revision rows the gates rejected"] = (
            f"{rejected.get('prompt_tokens', 0)} / {rejected.get('completion_tokens', 0)} "
            f"({rejected.get('rows', 0)} rows)")
    if priced:
        rows[f"cost (USD; {priced.get('price_input')} / {priced.get('price_output')} per million tokens "
             "in / out)"] = f"{priced.get('total', 0):.4f}"
        for k, name in (("per_sft_row", "cost per accepted SFT row (revise stage)"),
                        ("per_preference_pair", "cost per preference pair (label stage)")):
            if priced.get(k) is not None:
                rows[name] = f"{priced[k]:.6f}"
    return rows


def _settings(table: dict[str, tuple[str, str]], values: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, meaning) per recorded setting, known ones first; unknown keys by their code name."""
    return ([(name, values[k], meaning) for k, (name, meaning) in table.items() if k in values]
            + [(f"`{k}`", v, "") for k, v in values.items() if k not in table and k not in COT_SETTINGS])


def _sampling(cfg: dict[str, Any]) -> str:
    keys = ("max_tokens", "temperature", "top_p", "repetition_penalty", "stop")
    return ", ".join(f"{k} {_fmt(v)}" for k, v in cfg.items() if k in keys and v not in ([], None))


def revise_settings(cfg: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """The critique-and-revision settings (``ReviseConfig.to_dict()``), each once."""
    calls = {"generate": "first answer", "critique": "critique", "revise": "revision"}
    out: list[tuple[str, Any, str]] = [
        ("rounds", cfg.get("rounds"), "critique-and-revision rounds per prompt, one principle each"),
        ("seed", cfg.get("seed"), "seed of the principle draw and of sampling")]
    out += [(f"{name} sampling", _sampling(cfg[k]), "") for k, name in calls.items() if isinstance(cfg.get(k), dict)]
    return out + [(f"`{k}`", v, "") for k, v in cfg.items() if k not in ("rounds", "seed", *calls)]


def sources(info: RunInfo, rows: dict[str, list[dict[str, Any]]], output: str | None) -> list[dict[str, Any]]:
    """Where the prompts came from: run.json's input, else the files the rows' ``source`` names."""
    given = ((info.manifest or {}).get("config") or {}).get("input")
    own = {"", "revisions", "sample", "pairs", *KINDS.values(), LABELS_FILE}  # the run's own files, pair origins
    names = [str(portable(given, output))] if isinstance(given, str) and given else sorted(
        {str(r.get("source") or "").rpartition(":")[0] or str(r.get("source") or "")
         for r in rows.get("sft", []) + rows.get("prefs", [])} - own)
    out = []
    for name in names:
        known = KNOWN_SOURCES.get(name.rsplit("/", 1)[-1]) or KNOWN_SOURCES.get(name)
        out.append({"name": name, "about": known[0] if known else None, "license": known[1] if known else None})
    return out


def _digest(dump: dict[str, Any]) -> str:
    try:
        return Constitution.model_validate(dump).digest()
    except Exception:
        return sha256_json(dump)


def _size(n: int) -> str:
    return ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M")[
        bisect.bisect_right((1_000, 10_000, 100_000, 1_000_000), n)]


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


def render_card(export: Export, configs: list[dict[str, Any]], *, license: str | None = None,
                repo_id: str | None = None) -> str:
    """The card: ``license`` (a Hub license id) defaults to run.json's ``config.license``, then to
    the known licence of the prompts' source, then ``unknown``."""
    info, dd = export.info, export.dataset
    output = ((info.manifest or {}).get("config") or {}).get("output")
    m = portable(scrub(info.manifest or {}), output if isinstance(output, str) else None)
    prov = {k: portable(scrub(v)) for k, v in info.provenance.items()}
    rows = export_rows(dd)
    srcs = sources(info, rows, output if isinstance(output, str) else None)
    known = {s["license"] for s in srcs}
    configured = (m.get("config") or {}).get("license")
    origin = "given" if license not in (None, "", "unknown") else "config" if configured else "source"
    if origin != "given":
        license = configured or (known.pop() if len(known) == 1 and None not in known else "unknown")
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
    revise = m.get("revise") or prov.get("sft", {}).get("config")
    try:
        headline, error = build_report(info.folder)["headline"], None
    except CaiError as e:
        headline, error = {}, str(e).replace(f"{info.folder}{os.sep}", "")
    config = {k: v for k, v in (m.get("config") or {}).items() if k not in ("label", "revise", "license")}
    label_cfg = (m.get("config") or {}).get("label") or {}
    rest = {k: v for k, v in m.items() if k not in (
        "constitution", "judge", "models", "counts", "revise", "history", "calls", "elapsed_s", "config", "usage",
        "cost")}
    page = _template().render(
        meta=meta, meta_yaml=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), mark=CARD_MARK,
        version=__version__, repo=repo_id, info=info, trace=TRACE, kinds=[c["config_name"] for c in configs],
        splits=[(c["config_name"], f["split"], dd[f["split"]].num_rows, len(set(dd[f["split"]]["prompt_id"])))
                for c in configs for f in c["data_files"]],
        models=m.get("models") or {k: p.get("model") for k, p in prov.items()},
        judge=_settings(JUDGE_SETTINGS | (COT_SETTINGS if judge.get("mode") == "cot" else {}), judge)
        + _settings(PAIR_SETTINGS, {k: v for k, v in label_cfg.items() if k in PAIR_SETTINGS and v is not None})
        if isinstance(judge, dict) else None,
        revise=revise_settings(revise) if isinstance(revise, dict) else None,
        diagnostics=diagnostics(rows, info), cost=cost(m) if info.manifest else {},
        label_source=any("label_source" in r for r in rows.get("prefs") or []),
        sources=srcs, license=license, license_origin=origin, report_error=error,
        report_html=(info.folder / "report.html").exists(),
        headline=[(*FIGURES.get(k, (k, "")), f"{v:.1%}" if k in RATES else _fmt(v))
                  for k, v in headline.items() if v is not None],
        constitutions=_constitutions(info), rest={**rest, **({"config": config} if config else {})})
    return page.rstrip() + "\n"
