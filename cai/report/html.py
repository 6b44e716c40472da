"""``report.html``: one self-contained page (no network) from ``page.html.j2``: headline figures,
inline SVG plots (``cai.report.svg``), a per-principle table and a filterable table of rows.

Jinja2 renders it with autoescape on: every text from the run (prompts and answers come from
models and red-team data) is escaped as it goes in, and the table's rows go in as ``|tojson``
(``<``, ``>``, ``&`` and ``'`` written as ``\\u`` escapes, so no text can close the element).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from ..analysis import MAX_ROWS, figures, load_run
from ..analysis.read import one_line
from ..errors import InputError
from ..eval.refusal import MARKER_NAMES
from ..review.agreement import SAMPLE_TEXT, summary_lines
from .svg import LOSS, SERIES, WIN, grouped_bars_svg, histogram_svg, lines_svg, reliability_svg, stacked_bars_svg


def _pct(v: Any, digits: int = 0) -> str:
    return "" if not isinstance(v, int | float) or isinstance(v, bool) else f"{100 * v:.{digits}f}%"


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return ""
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def _growth(v: Any) -> str:
    return "" if isinstance(v, bool) or not isinstance(v, int | float) else f"\u00d7{v:.2f}"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "allow_nan": False, "separators": (",", ":")}
    return env.from_string(files(__package__).joinpath("page.html.j2").read_text(encoding="utf-8"))


def _plots(report: dict[str, Any]) -> list[tuple[str, Markup, str]]:
    """(title, svg, caption) per figure that has something to plot; the others are left out."""
    hist, mk, by_round = report["lengths"]["histogram"], report["markers"], report["revise"]["by_round"]
    per, human = report["labels"]["per_principle"], report["labels"]["overall"].get("human")
    bars = sorted(((pid, v["revision"]["win_rate"], v["revision"]["tie_rate"], v["revision"]["loss_rate"],
                    v["revision"]["pairs"]) for pid, v in per.items() if v["revision"]["pairs"]), key=lambda b: -b[1])
    xs = [r["round"] for r in by_round if r["n"]] if len(by_round) > 1 else []
    growth = [f"round {r['round']} \u00d7{r['growth']:.2f} (median per-row ratio \u00d7{r['median_row_ratio']:.2f})"
              for r in by_round if r.get("growth") is not None and r.get("median_row_ratio") is not None]
    figs = [
        ("Length of chosen vs rejected answers",
         histogram_svg(hist["edges"], [("chosen", hist["chosen"], WIN), ("rejected", hist["rejected"], LOSS)],
                       "answer length histogram", "characters"),
         f"Decided pairs; the longest 1% go in the last bin. Mean chosen {_num(report['lengths']['chosen']['mean'], 0)}"
         f", rejected {_num(report['lengths']['rejected']['mean'], 0)}."),
        ("Revision preferred, per judge principle", stacked_bars_svg(bars, "revision win rate per principle"),
         "For each principle the judge weighed: how often its verdict (mean of both orders) "
         "preferred the revised answer."),
        ("Calibration against human labels",
         reliability_svg(human["reliability"], "reliability diagram") if human else None,
         f"{human['pairs']} human-labelled pairs in 10 equal-width bins of p(A); on the diagonal is "
         f"calibrated. Brier {_num(human['brier'])}, ECE {_num(human['ece'])}." if human else ""),
        ("Marker rates by revision round",
         lines_svg(xs, [(name, [r["markers"][name] for r in by_round], SERIES[i % len(SERIES)])
                        for i, name in enumerate(MARKER_NAMES)], "marker rates by round",
                   "round (0: initial answer)", "share of answers") if xs else None,
         "Share of answers with each text marker (cai.eval.refusal) after each round."),
        ("Answer length by revision round",
         lines_svg(xs, [("mean", [r["mean"] for r in by_round], SERIES[0]),
                        ("median", [r["median"] for r in by_round], SERIES[1])],
                   "answer length by round", "round (0: initial answer)", "characters", percent=False) if xs else None,
         "Growth of the mean length per round (mean after / mean before): " + "; ".join(growth) + "."
         if growth else "Mean and median answer length after each round."),
        ("Markers in chosen vs rejected answers",
         grouped_bars_svg(list(MARKER_NAMES), [("chosen", [mk["chosen"][n] for n in MARKER_NAMES], WIN),
                                               ("rejected", [mk["rejected"][n] for n in MARKER_NAMES], LOSS)],
                          "markers in chosen and rejected answers") if mk["pairs"] else None,
         f"Over {mk['pairs']} decided pairs.")]
    return [(title, svg, caption) for title, svg, caption in figs if svg is not None]


def _tiles(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(value, name, what it means) per headline figure that applies to this folder."""
    h, bias = report["headline"], report["length_bias"]["revision"] or report["length_bias"]["all"] or {}
    revised, pairs = h["rows_revised"], h["pairs_labelled"]
    tiles = [
        ("Rows revised", _num(revised) if revised or not pairs else None, "rows in revisions.jsonl"),
        ("Pairs labelled", _num(pairs) if pairs or not revised else None, "rows in labels.jsonl"),
        ("Failures", _num(h["failures"]), "rows in *.failures.jsonl"),
        ("Revision preferred", _pct(h["revision_win_rate"], 1),
         "share of revision pairs where the judge's label is the revised answer (ties count as not won)"),
        ("Revision preferred, length-controlled", _pct(h["revision_win_rate_length_controlled"], 1),
         "the same, predicted at equal answer length (logistic regression on the length difference)"),
        ("Mean p(revision)", _num(h["mean_p_revision"]), "mean soft label of the revised answer"),
        ("Ties", _pct(h["tie_rate"], 1), "pairs whose soft label is within the tie threshold of 0.5"),
        ("Position consistency", _pct(h["position_consistency"], 1),
         "pairs whose A/B and B/A orders prefer the same answer"),
        ("Abstentions", _pct(h["abstention_rate"], 1), "judgements with no option in the top log-probs"),
        ("First slot", _pct(h["first_slot_rate"], 1), "judgements preferring the answer shown first"),
        ("Longer chosen", _pct(h["longer_chosen"], 1), "decided pairs where the chosen answer is the longer"),
        ("Length corr.", _num(h["length_pearson"], 2),
         f"Pearson r of the length difference with the soft label ({bias.get('unit') or 'chars'})"),
        ("Length growth", _growth(h["length_growth"]),
         "ratio of mean lengths: mean revised answer / mean initial answer (characters)"),
        ("Median per-row length ratio", _growth(h["length_growth_median_ratio"]),
         "median over rows of revised length / initial length"),
    ]
    if "best_of_n_rows" in h:  # a best-of-n folder: where its rows and pairs came from
        bon = report["best_of_n"]
        n = ", ".join(f"{k} ({v})" for k, v in bon["samples"].items())
        tiles[1:1] = [("Best-of-n rows", _num(h["best_of_n_rows"]), f"prompts ranked (answers per prompt: {n}); "
                       "the best answer of each is an SFT row (best_of_n.jsonl)"),
                      ("Best-vs-worst pairs", _num(h["best_of_n_pairs"]), "pairs in best_of_n.pairs.jsonl "
                       "(margin > 0, not gated); their matches are the pairs labelled"),
                      ("Mean margin", _num(h["best_of_n_mean_margin"]),
                       "the best answer's soft win rate minus the worst's, per prompt")]
    if h["human_pairs"]:
        tiles += [("Human agreement", _pct(h["human_agreement"], 1),
                   f"judge label equals the human's, over the decided ones of {h['human_pairs']} human-labelled "
                   f"pairs (coverage {_pct(h['human_coverage'], 1)})"),
                  ("Brier", _num(h["brier"]), "mean (p(A) - human chose A)^2"),
                  ("ECE", _num(h["ece"]), "expected calibration error, 10 equal-width bins")]
    tiles += _usage_tiles(report.get("usage") or {})
    return [(v, k, tip) for k, v, tip in tiles if v]


def _usage_tiles(u: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """Tokens in and out (run.json's ``usage``) and their cost, when the run has them."""
    cost = u.get("cost") or {}
    per = ", ".join(f"{what} ${cost[k]:.6f}" for k, what in (("per_sft_row", "per SFT row"),
                                                            ("per_preference_pair", "per preference pair"))
                    if cost.get(k) is not None)
    return [("Tokens in / out", f"{u.get('prompt_tokens', 0):,} / {u.get('completion_tokens', 0):,}",
             f"prompt / completion tokens the servers served over every run of this folder "
             f"({u.get('cached_prompt_tokens', 0):,} prompt tokens from their prefix cache)"),
            ("Cost", f"${cost['total']:.4f}" if cost else None,
             f"USD at {cost.get('price_input')} / {cost.get('price_output')} per million tokens in / out"
             + (f"; {per}" if per else ""))] if u else []


def _table(head: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """A table without the columns that hold nothing (the first, the name, always stays)."""
    keep = [i for i in range(len(head)) if i == 0 or any(r[i] for r in rows)]
    return [head[i] for i in keep], [[r[i] for i in keep] for r in rows]


def _principles(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows): the revision principles and the judge's principles, apart."""
    judged, revised = report["labels"]["per_principle"], report["revise"]["per_principle"]
    order = list(report["run"].get("principles") or {})

    def ordered(names: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:  # the constitution's order first
        return [(n, names[n]) for n in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))]

    out = []
    if revised:
        out.append(("Revision principles", "The principles drawn for critique and revision rounds.",
                    *_table(["principle", "rounds", "length growth (ratio of mean lengths)",
                             "final revision preferred by the judge", "revision pairs judged"],
                            [[n, _num(r["rounds"]), _growth(r["growth"]), _pct(r["judged"]["win_rate"]),
                              _num(r["judged"]["pairs"]) if r["judged"]["pairs"] else ""]
                             for n, r in ordered(revised)])))
    if judged:
        out.append(("Judge principles", "The principles the judge weighed each pair by.",
                    *_table(["principle", "judged pairs", "revision preferred", "mean p(revision)", "ties",
                             "position consistency", "abstentions", "human agreement"],
                            [[n, _num(j["pairs"]), _pct(j["revision"]["win_rate"]), _num(j["revision"]["mean_p"], 2),
                              _pct(j["tie_rate"]), _pct(j["position_consistency"]), _pct(j["abstention_rate"]),
                              _pct((j.get("human") or {}).get("agreement"))] for n, j in ordered(judged)])))
    return out


def _human_review(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The judge against people (`cai review`'s human_labels.jsonl), when the run has any."""
    hr = report.get("human_review")
    return [("Judge vs human (cai review)", SAMPLE_TEXT[hr["sample"]], ["figure", "value"],
             [[k, v] for k, v in summary_lines(hr).items()])] if hr else []


def _rewards(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """A training run's rewards (``cai.trl.ConstitutionReward(record=...)``) by step, when there are any."""
    if not (rw := report.get("rewards")):
        return []
    text = (f"{rw['file']} ({rw['mode']} mode): {rw['scored']:,} of {rw['completions']:,} completions scored, "
            f"mean reward {_num(rw['mean'], 3)}.")
    return [("Rewards by training step", text, ["step", "completions", "scored", "mean", "lowest", "highest"],
             [[str(s["step"]), _num(s["completions"]), _num(s["scored"]), _num(s["mean"], 3), _num(s["min"], 3),
               _num(s["max"], 3)] for s in rw["by_step"]])]


def render(report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The page for a report (``cai.analysis.figures``) and its table rows."""
    run = report["run"]
    cut = run.get("text_chars") or 0
    models = run.get("models") or {}
    model_text = ", ".join(f"{k}: {v}" for k, v in models.items()) if isinstance(models, dict) else str(models or "")
    const = run.get("constitution")
    meta = " \u00b7 ".join(str(x) for x in (
        run.get("dir"), const and f"constitution {const}" + (f" v{run['constitution_version']}"
                                                            if run.get("constitution_version") else ""),
        model_text, run.get("label_mode") and f"judge mode {run['label_mode']}",
        run.get("cai_version") and f"cai {run['cai_version']}") if x)
    total = run.get("table_total", len(rows))
    cap = (f"The table holds the first {len(rows):,} of {total:,} rows (texts cut at {cut:,} characters) to "
           "keep this page small; revisions.jsonl and labels.jsonl hold them all." if len(rows) < total else
           f"All {total:,} rows (texts cut at {cut:,} characters).")
    gates = {**report["revise"].get("gates", {}), **report["labels"].get("gates", {}),
             **(report.get("best_of_n") or {}).get("gates", {})}
    return _template().render(
        run=run, rows=list(rows), meta=meta, cap=cap, plots=_plots(report), tiles=_tiles(report),
        tables=_principles(report) + _human_review(report) + _rewards(report),
        gate_text=("Gate flags: " + ", ".join(f"{k} ({v})" for k, v in sorted(gates.items())) + ".") if gates else "")


def _write_all(files: dict[Path, str]) -> None:
    """Write every file to a ``.tmp`` beside it first, then rename each into place: an error
    while building or writing leaves the old files (or none), never a half-written one."""
    tmps = {path.with_name(f".{path.name}.{os.getpid()}.tmp"): path for path in files}
    try:
        for tmp, path in tmps.items():
            with tmp.open("w", encoding="utf-8") as f:
                f.write(files[path])
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def write_report(run_dir: Path, out_dir: Path | None = None, *, unit: str = "chars",
                 max_rows: int = MAX_ROWS) -> tuple[Path, Path]:
    """Write ``report.json`` (the figures) and ``report.html`` (the page) into ``out_dir``
    (default: the run folder); return their paths."""
    run_dir = Path(run_dir)
    data = load_run(run_dir, unit=unit, max_rows=max_rows)
    report = figures(data)
    page = render(report, data.table)
    out = Path(out_dir) if out_dir is not None else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the report folder ({one_line(e)})") from None
    json_path, html_path = out / "report.json", out / "report.html"
    try:
        _write_all({json_path: json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    html_path: page})
    except OSError as e:
        raise InputError(f"{out}: cannot write the report ({one_line(e)})") from None
    return json_path, html_path
