"""``report.html``: one self-contained page (no network): headline figures, inline SVG plots, a
per-principle table and a filterable table of rows.

Every text from the run (prompts and answers come from models and red-team data) reaches the
page escaped: in the markup through ``html.escape``; the table's rows travel as JSON inside a
``<script type="application/json">`` element with ``<``, ``>`` and ``&`` written as ``\\u`` escapes
(so no text can close the element), and the page's script puts them in the table with
``textContent`` only, never as markup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from ..eval.refusal import MARKER_NAMES

WIN, TIE, LOSS = "#2a9d8f", "#b8b8b8", "#e76f51"
SERIES = ("#3a6ea5", "#e9a03b", "#8e5ea2", "#d1495b", "#2a9d8f", "#6c757d")
PLOT_W, PLOT_H = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 28, 40


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _pct(v: Any, digits: int = 0) -> str:
    return "n/a" if not isinstance(v, int | float) or isinstance(v, bool) else f"{100 * v:.{digits}f}%"


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "n/a"
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


# --- SVG --------------------------------------------------------------------------------------


def _svg(body: Sequence[str], title: str, width: int = PLOT_W, height: int = PLOT_H, cls: str = "plot") -> str:
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{"".join(body)}</svg>')


def _nice_max(v: float) -> tuple[float, int]:
    """A round axis maximum at or above ``v`` and how many ticks (of a round step) divide it."""
    if v <= 0:
        return 1.0, 4
    raw = v / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    n = max(1, math.ceil(v / step - 1e-9))
    return step * n, n


def _frame(xlabel: str, ylabel: str, yticks: Sequence[tuple[float, str]], xticks: Sequence[tuple[float, str]],
           width: int = PLOT_W, height: int = PLOT_H) -> list[str]:
    """Axes, grid lines and tick labels; tick positions are in pixels."""
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - BOTTOM, TOP
    out = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
           f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for y, label in yticks:
        out.append(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    for x, label in xticks:
        out.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 15}" text-anchor="middle">{_e(label)}</text>')
    out.append(f'<text class="axlabel" x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle">'
               f'{_e(xlabel)}</text>')
    out.append(f'<text class="axlabel" x="12" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {(y0 + y1) / 2:.1f})">{_e(ylabel)}</text>')
    return out


def _legend(items: Sequence[tuple[str, str]], x: float, y: float = 14) -> list[str]:
    out = []
    for name, color in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text class="legend" x="{x + 14:.1f}" y="{y}">{_e(name)}</text>')
        x += 22 + 6.5 * len(name)
    return out


def histogram_svg(edges: Sequence[float], series: Sequence[tuple[str, Sequence[int], str]], title: str,
                  xlabel: str) -> str | None:
    """Overlaid histograms on shared bins."""
    if len(edges) < 2 or not any(sum(c) for _, c, _ in series):
        return None
    x0, x1, y0, y1 = LEFT, PLOT_W - RIGHT, PLOT_H - BOTTOM, TOP
    top, nt = _nice_max(max(max(c) for _, c, _ in series))
    lo, hi = edges[0], edges[-1]

    def sx(v: float) -> float:
        return x0 + (v - lo) / ((hi - lo) or 1) * (x1 - x0)

    def sy(v: float) -> float:
        return y0 - v / top * (y0 - y1)

    xfmt = (lambda v: f"{v:,.0f}") if hi - lo >= 20 else _fmt
    xtop, xn = _nice_max(hi - lo)
    xs = [lo + xtop * i / xn for i in range(xn + 1) if xtop * i / xn <= (hi - lo) * (1 + 1e-9)]
    body = _frame(xlabel, "pairs", [(sy(top * i / nt), _fmt(top * i / nt)) for i in range(nt + 1)],
                  [(sx(x), xfmt(x)) for x in xs])
    for _, counts, color in series:
        for i, c in enumerate(counts):
            if c:
                body.append(f'<rect x="{sx(edges[i]) + 0.5:.1f}" y="{sy(c):.1f}" '
                            f'width="{max(sx(edges[i + 1]) - sx(edges[i]) - 1, 1):.1f}" '
                            f'height="{y0 - sy(c):.1f}" fill="{color}" fill-opacity="0.55"><title>'
                            f'{_e(f"{_fmt(edges[i])}-{_fmt(edges[i + 1])}: {c}")}</title></rect>')
    body += _legend([(name, color) for name, _, color in series], x0 + 8)
    return _svg(body, title)


def stacked_bars_svg(rows: Sequence[tuple[str, float, float, float, int]], title: str) -> str | None:
    """Horizontal 100% bars (win, tie, loss shares) per name, with the count on the right."""
    if not rows:
        return None
    left, bar, gap = 190, 16, 6
    width = PLOT_W
    height = TOP + len(rows) * (bar + gap) + 24
    x1 = width - 64
    body = _legend([("revision preferred", WIN), ("tie", TIE), ("initial preferred", LOSS)], left)
    for i, (name, win, tie, loss, n) in enumerate(rows):
        y = TOP + i * (bar + gap)
        label = name if len(name) <= 28 else name[:27] + "\u2026"
        body.append(f'<text class="tick" x="{left - 6}" y="{y + bar - 4}" text-anchor="end">{_e(label)}'
                    f'<title>{_e(name)}</title></text>')
        x = float(left)
        for share, color in ((win, WIN), (tie, TIE), (loss, LOSS)):
            w = share * (x1 - left)
            if w > 0:
                body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}">'
                            f'<title>{_e(f"{name}: {100 * share:.0f}% of {n}")}</title></rect>')
            x += w
        body.append(f'<text class="tick" x="{x1 + 6}" y="{y + bar - 4}">{_e(f"{100 * win:.0f}% (n={n})")}</text>')
    for frac in (0.0, 0.5, 1.0):
        xx = left + frac * (x1 - left)
        body.append(f'<line class="grid" x1="{xx:.1f}" y1="{TOP - 4}" x2="{xx:.1f}" y2="{height - 20}"/>'
                    f'<text class="tick" x="{xx:.1f}" y="{height - 6}" text-anchor="middle">{frac:.0%}</text>')
    return _svg(body, title, width, height)


def reliability_svg(bins: Sequence[dict[str, Any]], title: str) -> str | None:
    """Observed rate against mean probability per bin, beside the diagonal; dot area ~ count."""
    pts = [(b["mean_p"], b["rate"], b["count"]) for b in bins if b.get("count")]
    if not pts:
        return None
    size = 300
    x0, x1, y0, y1 = LEFT, size - RIGHT, size - BOTTOM, TOP

    def sx(v: float) -> float:
        return x0 + v * (x1 - x0)

    def sy(v: float) -> float:
        return y0 - v * (y0 - y1)

    ticks = [(i / 4, f"{i / 4:.2f}") for i in range(5)]
    body = _frame("judge p(A)", "human chose A (rate)", [(sy(v), t) for v, t in ticks],
                  [(sx(v), t) for v, t in ticks], size, size)
    body.append(f'<line class="diag" x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}"/>')
    most = max(c for *_, c in pts)
    line = " ".join(f"{sx(p):.1f},{sy(r):.1f}" for p, r, _ in pts)
    body.append(f'<polyline points="{line}" fill="none" stroke="{SERIES[0]}" stroke-width="1.5"/>')
    for p, r, c in pts:
        rad = 3 + 6 * math.sqrt(c / most)
        body.append(f'<circle cx="{sx(p):.1f}" cy="{sy(r):.1f}" r="{rad:.1f}" fill="{SERIES[0]}" '
                    f'fill-opacity="0.7"><title>{_e(f"p={p:.2f}, rate={r:.2f}, n={c}")}</title></circle>')
    return _svg(body, title, size, size, "plot square")


def lines_svg(xs: Sequence[int], series: Sequence[tuple[str, Sequence[float | None], str]], title: str,
              xlabel: str, ylabel: str, percent: bool = True) -> str | None:
    """One line per series over integer x (rounds)."""
    if not xs or not series:
        return None
    values = [v for _, vs, _ in series for v in vs if v is not None]
    top, nt = _nice_max(max(values, default=0.0) or (0.1 if percent else 1.0))
    x0, x1, y0, y1 = LEFT, PLOT_W - RIGHT - 110, PLOT_H - BOTTOM, TOP
    span = (max(xs) - min(xs)) or 1

    def sx(v: float) -> float:
        return x0 + (v - min(xs)) / span * (x1 - x0) if len(xs) > 1 else (x0 + x1) / 2

    def sy(v: float) -> float:
        return y0 - v / top * (y0 - y1)

    label = (lambda v: _fmt(100 * v) + "%") if percent else _fmt
    body = _frame(xlabel, ylabel, [(sy(top * i / nt), label(top * i / nt)) for i in range(nt + 1)],
                  [(sx(x), str(x)) for x in xs])
    for k, (name, vs, color) in enumerate(series):
        pts = [(sx(x), sy(v)) for x, v in zip(xs, vs, strict=True) if v is not None]
        if len(pts) > 1:
            body.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="none" '
                        f'stroke="{color}" stroke-width="2"/>')
        for (a, b), v in zip(pts, [v for v in vs if v is not None], strict=True):
            body.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"><title>'
                        f'{_e(f"{name}: {label(v)}")}</title></circle>')
        body.append(f'<rect x="{x1 + 14}" y="{TOP + 16 * k}" width="10" height="10" fill="{color}"/>'
                    f'<text class="legend" x="{x1 + 28}" y="{TOP + 16 * k + 9}">{_e(name)}</text>')
    return _svg(body, title)


def grouped_bars_svg(names: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]],
                     title: str) -> str | None:
    """Vertical grouped bars of rates (0..1) per name."""
    if not names or not series:
        return None
    x0, x1, y0, y1 = LEFT, PLOT_W - RIGHT, PLOT_H - BOTTOM, TOP
    top, nt = _nice_max(max((v for _, vs, _ in series for v in vs), default=0.0) or 0.1)
    slot = (x1 - x0) / len(names)
    bw = slot * 0.8 / len(series)

    def sy(v: float) -> float:
        return y0 - v / top * (y0 - y1)

    body = _frame("", "share of answers", [(sy(top * i / nt), _fmt(100 * top * i / nt) + "%") for i in range(nt + 1)],
                  [(x0 + slot * (i + 0.5), n) for i, n in enumerate(names)])
    for k, (sname, vs, color) in enumerate(series):
        for i, v in enumerate(vs):
            x = x0 + slot * i + slot * 0.1 + k * bw
            body.append(f'<rect x="{x:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" height="{y0 - sy(v):.1f}" '
                        f'fill="{color}"><title>{_e(f"{sname}, {names[i]}: {100 * v:.1f}%")}</title></rect>')
    body += _legend([(n, c) for n, _, c in series], x0 + 8)
    return _svg(body, title)


# --- the page ---------------------------------------------------------------------------------


def _figure(title: str, svg: str | None, caption: str, missing: str) -> str:
    inner = svg if svg else f'<p class="missing">{_e(missing)}</p>'
    return f'<figure><h3>{_e(title)}</h3>{inner}<figcaption>{_e(caption)}</figcaption></figure>'


def _cards(report: dict[str, Any]) -> str:
    h = report["headline"]
    bias = report["length_bias"].get("revision") or report["length_bias"].get("all") or {}
    cards = [
        ("Rows revised", _num(h["rows_revised"]), "rows in revisions.jsonl"),
        ("Pairs labelled", _num(h["pairs_labelled"]), "rows in labels.jsonl"),
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
        ("First slot", _pct(h.get("first_slot_rate"), 1), "judgements preferring the answer shown first"),
        ("Longer chosen", _pct(h["longer_chosen"], 1), "decided pairs where the chosen answer is the longer"),
        ("Length corr.", _num(h["length_pearson"], 2),
         f"Pearson r of the length difference with the soft label ({bias.get('unit', 'chars')})"),
        ("Length growth", "n/a" if h["length_growth"] is None else f"\u00d7{h['length_growth']:.2f}",
         "mean ratio of revised to initial answer length"),
    ]
    if h.get("human_pairs"):
        cards += [("Human agreement", _pct(h["human_agreement"], 1),
                   f"judge label equals the human's, over the decided ones of {h['human_pairs']} human-labelled "
                   f"pairs (coverage {_pct(h.get('human_coverage'), 1)})"),
                  ("Brier", _num(h["brier"]), "mean (p(A) - human chose A)^2"),
                  ("ECE", _num(h["ece"]), "expected calibration error, 10 equal-width bins")]
    return "".join(f'<div class="card" title="{_e(tip)}"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div>'
                   f"</div>" for k, v, tip in cards)


def _principle_table(report: dict[str, Any]) -> str:
    judged = report["labels"]["per_principle"]
    revised = report["revise"]["per_principle"]
    names = list(dict.fromkeys([*report["run"].get("principles", {}), *revised, *judged]))
    names = [n for n in names if n in judged or n in revised]
    if not names:
        return ""
    rows = []
    for n in names:
        j, r = judged.get(n, {}), revised.get(n, {})
        rev, hum = j.get("revision") or {}, j.get("human") or {}
        cells = [n, _num(r.get("rounds")), "n/a" if r.get("growth") is None else f"\u00d7{r['growth']:.2f}",
                 _pct((r.get("judged") or {}).get("win_rate")), _num(j.get("pairs")), _pct(rev.get("win_rate")),
                 _num(rev.get("mean_p"), 2), _pct(j.get("tie_rate")), _pct(j.get("position_consistency")),
                 _pct(j.get("abstention_rate")), _pct(hum.get("agreement"))]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    head = ["principle", "revise rounds", "length growth", "final revision preferred", "judged pairs",
            "revision preferred (this principle)", "mean p(revision)", "ties", "position consistency",
            "abstentions", "human agreement"]
    return ('<div class="scroll"><table class="principles"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _plots(report: dict[str, Any]) -> str:
    figs = []
    hist = report["lengths"]["histogram"]
    figs.append(_figure(
        "Length of chosen vs rejected answers",
        histogram_svg(hist["edges"], [("chosen", hist["chosen"], WIN), ("rejected", hist["rejected"], LOSS)],
                      "answer length histogram", "characters"),
        f"Decided pairs; the longest 1% go in the last bin. Mean chosen "
        f"{_num(report['lengths']['chosen']['mean'], 0)}, rejected {_num(report['lengths']['rejected']['mean'], 0)}.",
        "No decided pairs."))
    per = report["labels"]["per_principle"]
    bars = [(pid, v["revision"]["win_rate"], v["revision"]["tie_rate"], v["revision"]["loss_rate"],
             v["revision"]["pairs"]) for pid, v in per.items() if v["revision"]["pairs"]]
    bars.sort(key=lambda b: -b[1])
    figs.append(_figure("Revision preferred, per judge principle",
                        stacked_bars_svg(bars, "revision win rate per principle"),
                        "For each principle the judge weighed: how often its verdict (mean of both orders) "
                        "preferred the revised answer.", "No revision pairs were labelled."))
    human = report["labels"]["overall"].get("human")
    if human:
        figs.append(_figure(
            "Calibration against human labels",
            reliability_svg(human["reliability"], "reliability diagram"),
            f"{human['pairs']} human-labelled pairs in 10 equal-width bins of p(A); on the diagonal is calibrated. "
            f"Brier {_num(human['brier'])}, ECE {_num(human['ece'])}.", "No human labels."))
    by_round = report["revise"]["by_round"]
    xs = [r["round"] for r in by_round]
    figs.append(_figure(
        "Marker rates by revision round",
        lines_svg(xs, [(name, [r["markers"][name] for r in by_round], SERIES[i % len(SERIES)])
                       for i, name in enumerate(MARKER_NAMES)], "marker rates by round", "round (0: initial answer)",
                  "share of answers"),
        "Share of answers with each text marker (cai.refusal) after each round.", "No revisions."))
    figs.append(_figure(
        "Answer length by revision round",
        lines_svg(xs, [("mean", [r["mean"] for r in by_round], SERIES[0]),
                       ("median", [r["median"] for r in by_round], SERIES[1])],
                  "answer length by round", "round (0: initial answer)", "characters", percent=False),
        "Mean growth per round: " + ", ".join(f"round {r['round']} \u00d7{r['growth']:.2f}"
                                              for r in by_round if r.get("growth") is not None) + ".",
        "No revisions."))
    mk = report["markers"]
    figs.append(_figure(
        "Markers in chosen vs rejected answers",
        grouped_bars_svg(list(MARKER_NAMES), [("chosen", [mk["chosen"][n] for n in MARKER_NAMES], WIN),
                                              ("rejected", [mk["rejected"][n] for n in MARKER_NAMES], LOSS)],
                         "markers in chosen and rejected answers") if mk["pairs"] else None,
        f"Over {mk['pairs']} decided pairs.", "No decided pairs."))
    return "".join(figs)


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its ``<script>`` element or start markup inside it."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


CSS = """
:root{--fg:#1d2330;--mute:#5b6475;--line:#e3e6ec;--bg:#f7f8fa;--card:#fff}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
color:var(--fg);background:var(--bg)}main{max-width:1240px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}h3{font-size:14px;margin:0 0 6px}
.meta{color:var(--mute);margin:0}.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));
gap:10px;margin-top:16px}.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .v{font-size:20px;font-weight:600}.card .k{color:var(--mute);font-size:12px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px}
figcaption{color:var(--mute);font-size:12px;margin-top:4px}.missing{color:var(--mute);font-style:italic}
svg.plot{width:100%;height:auto;max-height:420px;display:block}svg.plot.square{max-width:340px;margin:0 auto}
svg .axis{stroke:#8a93a3}svg .grid{stroke:#eceff3}svg .diag{stroke:#9aa3b2;stroke-dasharray:4 3}
svg text{font:11px system-ui,sans-serif;fill:#3b4352}svg .axlabel{fill:#5b6475}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;background:var(--card)}
th,td{border:1px solid var(--line);padding:5px 7px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
table.principles td:not(:first-child){text-align:right;white-space:nowrap}
.controls{display:flex;gap:8px;flex-wrap:wrap;align-items:center;margin:8px 0}
.controls input{flex:1;min-width:220px;padding:6px 8px;border:1px solid #c5cbd5;border-radius:6px}
.controls select,.controls button{padding:5px 8px;border:1px solid #c5cbd5;border-radius:6px;background:#fff}
#rows{table-layout:fixed;min-width:1100px}#rows td .txt{white-space:pre-wrap;max-height:220px;overflow:auto;
overflow-wrap:anywhere}#rows .rid{font-family:ui-monospace,monospace;font-size:12px;overflow-wrap:anywhere}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:9px;margin:1px 2px 1px 0;background:#eef1f5;
max-width:100%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;vertical-align:top}
.badge.win{background:#d5efe9}.badge.loss{background:#fadbd1}.badge.tie{background:#e6e6e6}
#rows td.verdict .badge{white-space:normal}
.badge.gate{background:#ffe8a3}.badge.mk{background:#e6ddf3}.note{color:var(--mute);font-size:12px}
details summary{cursor:pointer;color:#3a6ea5}.round{border-left:3px solid #d6dbe4;padding-left:8px;margin:6px 0}
.round b{font-size:12px}
"""

JS = """
(function(){
const rows=JSON.parse(document.getElementById('cai-rows').textContent);
const tbody=document.querySelector('#rows tbody'),q=document.getElementById('filter'),
 pr=document.getElementById('principle'),lb=document.getElementById('labelsel'),
 count=document.getElementById('count'),more=document.getElementById('more');
const PAGE=100;let shown=PAGE,matches=[];
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;
 if(text!==undefined&&text!==null)e.textContent=String(text);return e;}
function txt(t){return el('div','txt',t);}
function badge(text,cls){const b=el('span','badge '+cls,text);b.title=String(text);return b;}
function badges(td,list,cls){(list||[]).forEach(function(m){td.appendChild(badge(m,cls));});}
rows.forEach(function(r){r.principles=[].concat(r.revise_principles||[],r.judge_principles||[]);
 r.hay=[r.id,r.prompt,r.initial,r.final,r.response_a,r.response_b,r.label,r.origin].concat(r.principles,
 r.gates||[],(r.rounds||[]).map(function(x){return x.critique+'\\n'+x.revision;})).join('\\n').toLowerCase();});
const names=Array.from(new Set([].concat.apply([],rows.map(function(r){return r.principles;})))).sort();
names.forEach(function(n){const o=el('option',null,n);o.value=n;pr.appendChild(o);});
function verdict(r){const td=el('td','verdict');
 if(r.label===null||r.label===undefined){td.appendChild(el('span','note',r.failure?'not labelled: '+r.failure:
  'not labelled'));return td;}
 const cls=r.label==='revision'?'win':r.label==='initial'?'loss':r.label==='tie'?'tie':'';
 td.appendChild(badge(r.kind==='revision'&&r.label!=='tie'?r.label+' preferred':r.label,cls));
 if(typeof r.p==='number')td.appendChild(el('div','note',(r.kind==='revision'?'p(revision) ':'p(A) ')+r.p.toFixed(3)));
 if(r.human)td.appendChild(el('div','note','human: '+r.human));
 if(r.position_consistent===false)td.appendChild(el('div','note','orders disagree'));return td;}
function render(){tbody.textContent='';
 matches.slice(0,shown).forEach(function(r){const tr=el('tr');
  const id=el('td','id');id.appendChild(el('div','rid',r.id));
  badges(id,Array.from(new Set(r.principles)),'');tr.appendChild(id);
  const p=el('td');p.appendChild(txt(r.prompt));tr.appendChild(p);
  const a=el('td');a.appendChild(txt(r.kind==='revision'?r.initial:r.response_a));
  badges(a,r.kind==='revision'?r.markers_initial:r.markers_a,'mk');tr.appendChild(a);
  const c=el('td');if(r.rounds&&r.rounds.length){const d=el('details');
   d.appendChild(el('summary',null,r.rounds.length+' round'+(r.rounds.length>1?'s':'')));
   r.rounds.forEach(function(x){const b=el('div','round');b.appendChild(el('b',null,'Round '+x.round+': '+x.principle));
    b.appendChild(el('div','note','critique'));b.appendChild(txt(x.critique));
    b.appendChild(el('div','note','revision'));b.appendChild(txt(x.revision));d.appendChild(b);});
   c.appendChild(d);}
  else{c.appendChild(el('span','note',r.kind==='revision'?'no rounds':'(pair: '+(r.origin||'')+')'));}
  tr.appendChild(c);
  const f=el('td');f.appendChild(txt(r.kind==='revision'?r.final:r.response_b));
  badges(f,r.kind==='revision'?r.markers_final:r.markers_b,'mk');tr.appendChild(f);
  tr.appendChild(verdict(r));const g=el('td');badges(g,r.gates,'gate');tr.appendChild(g);tbody.appendChild(tr);});
 count.textContent=Math.min(shown,matches.length)+' shown, '+matches.length+' of '+rows.length+' rows match';
 more.hidden=matches.length<=shown;}
function apply(){const t=q.value.trim().toLowerCase(),p=pr.value,l=lb.value;
 matches=rows.filter(function(r){return(!t||r.hay.indexOf(t)>=0)&&(!p||r.principles.indexOf(p)>=0)&&
  (!l||(l==='gated'?(r.gates||[]).length>0:String(r.label)===l));});shown=PAGE;render();}
q.addEventListener('input',apply);pr.addEventListener('change',apply);lb.addEventListener('change',apply);
more.addEventListener('click',function(){shown+=PAGE;render();});apply();
})();
"""


def render(report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The page for a report (``cai.report.figures.figures``) and its table rows."""
    run = report["run"]
    cut = run.get("text_chars") or 0
    models = run.get("models") or {}
    model_text = ", ".join(f"{k}: {v}" for k, v in models.items()) if isinstance(models, dict) else str(models)
    meta = " \u00b7 ".join(str(x) for x in (
        run.get("dir"), f"constitution {run.get('constitution') or 'n/a'}", model_text,
        f"judge mode {run.get('label_mode') or 'n/a'}", f"cai {run.get('cai_version') or '?'}") if x)
    total = run.get("table_total", len(rows))
    cap = (f"The table holds the first {len(rows):,} of {total:,} rows (texts cut at {cut:,} characters) to "
           "keep this page small; revisions.jsonl and labels.jsonl hold them all." if len(rows) < total else
           f"All {total:,} rows (texts cut at {cut:,} characters).")
    labels = [("", "any verdict"), ("revision", "revision preferred"), ("initial", "initial preferred"),
              ("tie", "tie"), ("a", "A preferred"), ("b", "B preferred"), ("gated", "has gate flags")]
    gates = {**report["revise"].get("gates", {}), **report["labels"].get("gates", {})}
    gate_text = ("Gate flags: " + ", ".join(f"{k} ({v})" for k, v in sorted(gates.items())) + ".") if gates else ""
    return "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>cai report: {_e(run.get('dir', ''))}</title><style>{CSS}</style></head><body><main>",
        f'<h1>cai run report</h1><p class="meta">{_e(meta)}</p>',
        f'<section class="cards">{_cards(report)}</section>',
        f'<h2>Plots</h2><section class="plots">{_plots(report)}</section>',
        "<h2>Per principle</h2>", _principle_table(report) or '<p class="missing">No principles.</p>',
        f'<h2>Rows</h2><p class="note">{_e(cap)} {_e(gate_text)}</p>',
        '<div class="controls"><input id="filter" type="search" placeholder="Filter: any text, id or principle" '
        'aria-label="filter rows"><select id="principle" aria-label="principle"><option value="">any principle'
        '</option></select><select id="labelsel" aria-label="verdict">',
        "".join(f'<option value="{_e(v)}">{_e(t)}</option>' for v, t in labels),
        '</select><span id="count" class="note"></span></div>',
        '<noscript><p class="missing">The table needs JavaScript.</p></noscript>',
        '<div class="scroll"><table id="rows"><colgroup><col style="width:11%"><col style="width:19%">'
        '<col style="width:17%"><col style="width:20%"><col style="width:17%"><col style="width:9%">'
        '<col style="width:7%"></colgroup><thead><tr><th>id / principles</th><th>prompt</th>'
        "<th>initial answer (or A)</th><th>critiques and revisions</th><th>revised answer (or B)</th>"
        "<th>verdict</th><th>gates</th></tr></thead><tbody></tbody></table></div>",
        '<p><button id="more" type="button" hidden>show 100 more</button></p>',
        f'<script type="application/json" id="cai-rows">{_json_for_script(list(rows))}</script>',
        f"<script>{JS}</script></main></body></html>\n",
    ])
