"""The report's plots as inline SVG: histograms, stacked and grouped bars, lines, a reliability
diagram. Each returns ``Markup`` (or None when there is nothing to draw); every text in it is
escaped by ``markupsafe`` as it is put in (``Markup.format``), never by hand."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from markupsafe import Markup

WIN, TIE, LOSS = "#2a9d8f", "#b8b8b8", "#e76f51"
SERIES = ("#3a6ea5", "#e9a03b", "#8e5ea2", "#d1495b", "#2a9d8f", "#6c757d")
PLOT_W, PLOT_H = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 28, 40
CHAR_W = 7  # width of a character of the 11px tick labels, rounded up (digits and "%()=" are narrower)


def fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _svg(body: Sequence[Markup], title: str, width: int = PLOT_W, height: int = PLOT_H,
         cls: str = "plot") -> Markup:
    return Markup('<svg class="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {}" role="img" '
                  'aria-label="{}"><title>{}</title>{}</svg>').format(cls, width, height, title, title,
                                                                      Markup("").join(body))


def _tip(shape: str, tip: str) -> Markup:
    """A shape (numbers only) with a hover title."""
    return Markup(shape + "<title>{}</title></" + shape[1:shape.index(" ")] + ">").format(tip)


def _text(attrs: str, text: str, tip: str | None = None) -> Markup:
    inner = Markup("{}").format(text) + (Markup("<title>{}</title>").format(tip) if tip is not None else "")
    return Markup("<text " + attrs + ">{}</text>").format(inner)


def _nice_max(v: float) -> tuple[float, int]:
    """A round axis maximum at or above ``v`` and how many ticks (of a round step) divide it."""
    if v <= 0:
        return 1.0, 4
    raw = v / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    n = max(1, math.ceil(v / step - 1e-9))
    return step * n, n


def _scale(lo: float, span: float, a: float, b: float) -> Callable[[float], float]:
    """The pixel position of a value: ``lo`` at ``a``, ``lo + span`` at ``b``."""
    return lambda v: a + (v - lo) / span * (b - a)


def _percent(x: float) -> str:
    return fmt(100 * x) + "%"


def _yaxis(v: float, label: Callable[[float], str]) -> tuple[Callable[[float], float], list[tuple[float, str]]]:
    """The y scale of a standard plot, from 0 to a round maximum at or above ``v``, and its ticks."""
    top, nt = _nice_max(v)
    sy = _scale(0, top, PLOT_H - BOTTOM, TOP)
    return sy, [(sy(top * i / nt), label(top * i / nt)) for i in range(nt + 1)]


def _frame(xlabel: str, ylabel: str, yticks: Sequence[tuple[float, str]], xticks: Sequence[tuple[float, str]],
           width: int = PLOT_W, height: int = PLOT_H) -> list[Markup]:
    """Axes, grid lines and tick labels; tick positions are in pixels."""
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - BOTTOM, TOP
    out = [Markup(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>'
                  f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>')]
    for y, label in yticks:
        out.append(Markup(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
                   + _text(f'class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end"', label))
    out += [_text(f'class="tick" x="{x:.1f}" y="{y0 + 15}" text-anchor="middle"', label) for x, label in xticks]
    mid = (y0 + y1) / 2
    return out + [_text(f'class="axlabel" x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle"', xlabel),
                  _text(f'class="axlabel" x="12" y="{mid:.1f}" text-anchor="middle" '
                        f'transform="rotate(-90 12 {mid:.1f})"', ylabel)]


def _legend(items: Sequence[tuple[str, str]], x: float, y: float = 14) -> list[Markup]:
    out = []
    for name, color in items:
        out.append(Markup(f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
                   + _text(f'class="legend" x="{x + 14:.1f}" y="{y}"', name))
        x += 22 + 6.5 * len(name)
    return out


def histogram_svg(edges: Sequence[float], series: Sequence[tuple[str, Sequence[int], str]], title: str,
                  xlabel: str) -> Markup | None:
    """Overlaid histograms on shared bins."""
    if len(edges) < 2 or not any(sum(c) for _, c, _ in series):
        return None
    x0, x1, y0 = LEFT, PLOT_W - RIGHT, PLOT_H - BOTTOM
    lo, hi = edges[0], edges[-1]
    sx, (sy, yticks) = _scale(lo, (hi - lo) or 1, x0, x1), _yaxis(max(max(c) for _, c, _ in series), fmt)
    xfmt = (lambda v: f"{v:,.0f}") if hi - lo >= 20 else fmt
    xtop, xn = _nice_max(hi - lo)
    xs = [lo + xtop * i / xn for i in range(xn + 1) if xtop * i / xn <= (hi - lo) * (1 + 1e-9)]
    body = _frame(xlabel, "pairs", yticks, [(sx(x), xfmt(x)) for x in xs])
    for _, counts, color in series:
        body += [_tip(f'<rect x="{sx(edges[i]) + 0.5:.1f}" y="{sy(c):.1f}" '
                      f'width="{max(sx(edges[i + 1]) - sx(edges[i]) - 1, 1):.1f}" '
                      f'height="{y0 - sy(c):.1f}" fill="{color}" fill-opacity="0.55">',
                      f"{fmt(edges[i])}-{fmt(edges[i + 1])}: {c}") for i, c in enumerate(counts) if c]
    body += _legend([(name, color) for name, _, color in series], x0 + 8)
    return _svg(body, title)


def stacked_bars_svg(rows: Sequence[tuple[str, float, float, float, int]], title: str) -> Markup | None:
    """Horizontal 100% bars (win, tie, loss shares) per name, with the count on the right."""
    if not rows:
        return None
    left, bar, gap = 190, 16, 6
    height = TOP + len(rows) * (bar + gap) + 24
    counts = [f"{100 * win:.0f}% (n={n})" for _, win, _, _, n in rows]
    x1 = PLOT_W - RIGHT - 6 - CHAR_W * max(len(c) for c in counts)  # room for the longest count label
    body = _legend([("revision preferred", WIN), ("tie", TIE), ("initial preferred", LOSS)], left)
    for i, (name, win, tie, loss, n) in enumerate(rows):
        y = TOP + i * (bar + gap)
        label = name if len(name) <= 28 else name[:27] + "\u2026"
        body.append(_text(f'class="tick" x="{left - 6}" y="{y + bar - 4}" text-anchor="end"', label, name))
        x = float(left)
        for share, color in ((win, WIN), (tie, TIE), (loss, LOSS)):
            w = share * (x1 - left)
            if w > 0:
                body.append(_tip(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}">',
                                 f"{name}: {100 * share:.0f}% of {n}"))
            x += w
        body.append(_text(f'class="tick" x="{x1 + 6:.1f}" y="{y + bar - 4}"', counts[i]))
    for frac in (0.0, 0.5, 1.0):
        xx = left + frac * (x1 - left)
        body.append(Markup(f'<line class="grid" x1="{xx:.1f}" y1="{TOP - 4}" x2="{xx:.1f}" y2="{height - 20}"/>'
                           f'<text class="tick" x="{xx:.1f}" y="{height - 6}" text-anchor="middle">{frac:.0%}</text>'))
    return _svg(body, title, PLOT_W, height)


def reliability_svg(bins: Sequence[dict[str, Any]], title: str) -> Markup | None:
    """Observed rate against mean probability per bin, beside the diagonal; dot area ~ count."""
    pts = [(b["mean_p"], b["rate"], b["count"]) for b in bins if b.get("count")]
    if not pts:
        return None
    size = 300
    x0, x1, y0, y1 = LEFT, size - RIGHT, size - BOTTOM, TOP

    sx, sy = _scale(0, 1, x0, x1), _scale(0, 1, y0, y1)
    ticks = [(i / 4, f"{i / 4:.2f}") for i in range(5)]
    body = _frame("judge p(A)", "human chose A (rate)", [(sy(v), t) for v, t in ticks],
                  [(sx(v), t) for v, t in ticks], size, size)
    most = max(c for *_, c in pts)
    line = " ".join(f"{sx(p):.1f},{sy(r):.1f}" for p, r, _ in pts)
    body.append(Markup(f'<line class="diag" x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}"/>'
                       f'<polyline points="{line}" fill="none" stroke="{SERIES[0]}" stroke-width="1.5"/>'))
    body += [_tip(f'<circle cx="{sx(p):.1f}" cy="{sy(r):.1f}" r="{3 + 6 * math.sqrt(c / most):.1f}" '
                  f'fill="{SERIES[0]}" fill-opacity="0.7">', f"p={p:.2f}, rate={r:.2f}, n={c}") for p, r, c in pts]
    return _svg(body, title, size, size, "plot square")


def lines_svg(xs: Sequence[int], series: Sequence[tuple[str, Sequence[float | None], str]], title: str,
              xlabel: str, ylabel: str, percent: bool = True) -> Markup | None:
    """One line per series over integer x (rounds)."""
    if not xs or not series:
        return None
    values = [v for _, vs, _ in series for v in vs if v is not None]
    label = _percent if percent else fmt
    sy, yticks = _yaxis(max(values, default=0.0) or (0.1 if percent else 1.0), label)
    x0, x1 = LEFT, PLOT_W - RIGHT - 110
    span = (max(xs) - min(xs)) or 1

    def sx(v: float) -> float:
        return x0 + (v - min(xs)) / span * (x1 - x0) if len(xs) > 1 else (x0 + x1) / 2

    body = _frame(xlabel, ylabel, yticks, [(sx(x), str(x)) for x in xs])
    for k, (name, vs, color) in enumerate(series):
        pts = [(sx(x), sy(v), v) for x, v in zip(xs, vs, strict=True) if v is not None]
        if len(pts) > 1:
            body.append(Markup(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b, _ in pts)}" '
                               f'fill="none" stroke="{color}" stroke-width="2"/>'))
        body += [_tip(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}">', f"{name}: {label(v)}")
                 for a, b, v in pts]
        body.append(Markup(f'<rect x="{x1 + 14}" y="{TOP + 16 * k}" width="10" height="10" fill="{color}"/>')
                    + _text(f'class="legend" x="{x1 + 28}" y="{TOP + 16 * k + 9}"', name))
    return _svg(body, title)


def grouped_bars_svg(names: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]],
                     title: str) -> Markup | None:
    """Vertical grouped bars of rates (0..1) per name."""
    if not names or not series:
        return None
    x0, x1, y0 = LEFT, PLOT_W - RIGHT, PLOT_H - BOTTOM
    sy, yticks = _yaxis(max((v for _, vs, _ in series for v in vs), default=0.0) or 0.1, _percent)
    slot = (x1 - x0) / len(names)
    bw = slot * 0.8 / len(series)
    body = _frame("", "share of answers", yticks, [(x0 + slot * (i + 0.5), n) for i, n in enumerate(names)])
    for k, (sname, vs, color) in enumerate(series):
        body += [_tip(f'<rect x="{x0 + slot * i + slot * 0.1 + k * bw:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" '
                      f'height="{y0 - sy(v):.1f}" fill="{color}">', f"{sname}, {names[i]}: {100 * v:.1f}%")
                 for i, v in enumerate(vs)]
    body += _legend([(n, c) for n, _, c in series], x0 + 8)
    return _svg(body, title)
