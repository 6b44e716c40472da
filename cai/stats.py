"""Statistics the report, `cai eval-judge` and the preference writer share: calibration against
human labels, and length bias.

Pure functions of plain numbers and label rows (dicts as in ``labels.jsonl``); numpy only.
Degenerate input (too few values, no variance, or labels of one class only where a fit needs
two) gives ``None`` rather than an error or a NaN, so a small or odd run still gets a report.

Calibration (``brier``, ``ece``, ``reliability``) is of a probability ``p`` of an event against
its outcome ``y`` (1 if it happened, else 0): in the report, ``p`` is the judge's ``p_a`` and
``y`` is 1 when the human preferred A. Response A is the human-preferred one in about half of
the pairs (``cai.pairs`` decides it by a hash of the pair id), so this is not the judge's
confidence in its own choice but its probability of the human's choice.

Length bias (``length_bias``, ``debiased_labels``) uses the difference ``d = len(A) - len(B)``
(characters, or whitespace-separated words as a rough token count). The length-controlled
preference rate fits a logistic regression ``P(A preferred) = sigmoid(b0 + b1 * d / sd(d))``
to the soft labels ``p_a`` (or to the hard labels, 1 for A and 0 for B, ties left out) and
reports ``sigmoid(b0)``: the predicted preference for A when both answers have the same
length, as length-controlled win rates do (AlpacaEval 2.0, Dubois et al. 2024). When A is
always the same kind of answer (the revision, in the report) it is that answer's win rate
with the length advantage taken out. A weak Gaussian prior on the slope (``RIDGE``; the
difference is standardised, so it is on the scale of one standard deviation) keeps the fit
finite when length separates the labels perfectly; with more than a few dozen pairs its
effect is negligible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_N = 3  # correlations and regressions need at least this many values
RIDGE = 0.1  # L2 penalty on the standardised length slope (not on the intercept)
EPS = 1e-3  # soft labels are clipped to [EPS, 1 - EPS] before taking log-odds
UNITS = ("chars", "words")

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def _finite_pairs(p: Iterable[float | None], y: Iterable[float | None]) -> tuple[FloatArray, FloatArray]:
    """The (p, y) pairs where both are finite numbers, as two float arrays."""
    ps, ys = list(p), list(y)
    if len(ps) != len(ys):
        raise ValueError(f"p and y differ in length ({len(ps)} != {len(ys)})")
    keep = [(float(a), float(b)) for a, b in zip(ps, ys, strict=True)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    arr = np.asarray(keep, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def brier(p: Iterable[float | None], y: Iterable[float | None]) -> float | None:
    """Mean squared difference between probability and outcome (0 is perfect); None when empty."""
    pa, ya = _finite_pairs(p, y)
    return float(np.mean((pa - ya) ** 2)) if pa.size else None


def reliability(p: Iterable[float | None], y: Iterable[float | None], bins: int = 10) -> list[dict[str, Any]]:
    """Per equal-width bin of ``p``: its edges, the mean ``p``, the observed rate of ``y`` and the
    count. Every bin is listed; an empty bin has ``count`` 0 and ``mean_p``/``rate`` None."""
    pa, ya = _finite_pairs(p, y)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    idx = np.clip(np.floor(pa * bins).astype(np.intp), 0, bins - 1)  # equal-width; 1.0 in the last bin
    out: list[dict[str, Any]] = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                    "mean_p": float(pa[sel].mean()) if n else None,
                    "rate": float(ya[sel].mean()) if n else None})
    return out


def ece(p: Iterable[float | None], y: Iterable[float | None], bins: int = 10) -> float | None:
    """Expected calibration error: sum over equal-width bins of (bin share) x |mean p - rate|."""
    table = reliability(p, y, bins)
    n = sum(b["count"] for b in table)
    return sum(b["count"] / n * abs(b["mean_p"] - b["rate"]) for b in table if b["count"]) if n else None


@dataclass
class Human:
    """A judge against human labels, counted pair by pair: ``add`` the judge's ``p_a``, the
    human's choice (a or b) and the judge's label (a, b or tie)."""

    p: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    agree: int = 0
    decided: int = 0
    decided_agree: int = 0

    def add(self, p_a: float, human: str, label: str | None) -> None:
        self.p.append(p_a)
        self.y.append(1.0 if human == "a" else 0.0)
        self.agree += label == human
        if label in ("a", "b"):
            self.decided += 1
            self.decided_agree += label == human

    def summary(self, with_bins: bool = True) -> dict[str, Any] | None:
        """``agreement`` over the pairs the judge decided, ``coverage`` the decided share,
        ``agreement_all`` a tie counted as a disagreement; soft agreement and calibration."""
        if not self.p:
            return None
        n = len(self.p)
        out: dict[str, Any] = {
            "pairs": n, "decided": self.decided,
            "agreement": self.decided_agree / self.decided if self.decided else None,
            "coverage": self.decided / n, "agreement_all": self.agree / n,
            "soft_agreement": sum(p if y else 1.0 - p for p, y in zip(self.p, self.y, strict=True)) / n,
            "brier": brier(self.p, self.y), "ece": ece(self.p, self.y),
        }
        if with_bins:
            out["reliability"] = reliability(self.p, self.y)
        return out


def pearson(x: Iterable[float], y: Iterable[float]) -> float | None:
    """Pearson correlation; None for fewer than ``MIN_N`` values or a constant side."""
    xa, ya = _finite_pairs(x, y)
    if xa.size < MIN_N or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return None
    xc, yc = xa - xa.mean(), ya - ya.mean()
    return float(np.clip((xc @ yc) / math.sqrt(float((xc @ xc) * (yc @ yc))), -1.0, 1.0))


def _ranks(a: FloatArray) -> FloatArray:
    """Ranks from 1, ties sharing their mean rank (as Spearman's rho needs)."""
    _, where, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # the last rank of each group of equal values
    return np.asarray((ends - (counts - 1) / 2)[where], dtype=np.float64)


def spearman(x: Iterable[float], y: Iterable[float]) -> float | None:
    """Spearman rank correlation (Pearson on mid-ranks); None as for ``pearson``."""
    xa, ya = _finite_pairs(x, y)
    return pearson(_ranks(xa), _ranks(ya))  # fewer than MIN_N values, or all equal: None


def logistic_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """Intercept and slope of ``P(y=1) = sigmoid(b0 + b1 x)`` by Newton's method (IRLS), for
    outcomes in [0, 1] (soft labels are fine: the loss is the cross-entropy), with an L2
    penalty ``RIDGE / 2 * b1**2`` on the slope. None when the fit cannot be made: fewer than
    ``MIN_N`` points, a constant ``x``, or outcomes all 0 or all 1 (the intercept would be
    infinite)."""
    xa, ya = _finite_pairs(x, y)
    if xa.size < MIN_N or np.ptp(xa) == 0 or ya.min() >= 1.0 or ya.max() <= 0.0:
        return None
    design = np.column_stack([np.ones_like(xa), xa])
    penalty = np.diag([0.0, RIDGE])
    beta = np.zeros(2)
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-(design @ beta)))
        grad = design.T @ (ya - mu) - penalty @ beta
        w = np.maximum(mu * (1.0 - mu), 1e-12)
        hess = design.T @ (design * w[:, None]) + penalty
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    if not np.all(np.isfinite(beta)):
        return None
    return float(beta[0]), float(beta[1])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _logit(p: float) -> float:
    p = min(max(p, EPS), 1.0 - EPS)
    return math.log(p / (1.0 - p))


def length_of(unit: str = "chars") -> Callable[[str], int]:
    """The length measure: ``chars`` (characters) or ``words`` (whitespace-separated, a rough
    token count that needs no tokenizer)."""
    if unit == "chars":
        return len
    if unit == "words":
        return lambda s: len(s.split())
    raise ValueError(f"unknown length unit {unit!r} (one of {', '.join(UNITS)})")


def _length_rows(rows: Iterable[Mapping[str, Any]], unit: str
                 ) -> tuple[list[tuple[str, float, float, float, str | None]], FloatArray, FloatArray]:
    """(id, len_a, len_b, p_a, label) for each row with a number ``p_a`` and both lengths: the
    row's ``len_a``/``len_b`` when given (numbers, already in ``unit``), else measured from
    ``response_a``/``response_b``; and, as arrays, the length differences and the ``p_a``."""
    size = length_of(unit)
    out = []
    for r in rows:
        p = r.get("p_a")
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
            continue
        lengths = []
        for side in ("a", "b"):
            given, text = r.get(f"len_{side}"), r.get(f"response_{side}")
            if isinstance(given, int | float) and not isinstance(given, bool):
                lengths.append(float(given))
            elif isinstance(text, str):
                lengths.append(float(size(text)))
        if len(lengths) == 2:
            out.append((str(r.get("id", "")), lengths[0], lengths[1], float(p), r.get("label")))
    d = np.asarray([la - lb for _, la, lb, _, _ in out], dtype=np.float64)
    return out, d, np.asarray([pa for *_, pa, _ in out], dtype=np.float64)


def _length_model(d: FloatArray, y: FloatArray) -> tuple[float, float, float] | None:
    """(b0, b1, sd): the logistic fit of ``y`` on the standardised difference ``d / sd``."""
    sd = float(np.std(d)) if d.size >= MIN_N else 0.0
    if sd == 0:
        return None
    fit = logistic_fit(list(d / sd), list(y))
    return None if fit is None else (fit[0], fit[1], sd)


def length_bias(rows: Iterable[Mapping[str, Any]], unit: str = "chars", soft: bool = True) -> dict[str, Any]:
    """How much answer length drives the labels of judged pairs (label rows: ``response_a``,
    ``response_b`` (or their lengths ``len_a``, ``len_b``), ``p_a``, ``label``).

    - ``longer_chosen``: among decided pairs (label a or b) whose two answers differ in length,
      the share where the chosen one is the longer (0.5: no bias); ``decided``/``equal_length``
      say how many pairs it is out of.
    - ``pearson``/``spearman``: correlation of ``len_a - len_b`` with ``p_a``.
    - ``lc_rate``: the length-controlled preference for A (see the module doc), beside
      ``raw_rate``, the plain mean of the same labels, and ``slope``, the change in log-odds of
      preferring A per standard deviation (``sd``) of the length difference.
    Each figure is None when it cannot be computed from these rows.
    """
    data, d, p = _length_rows(rows, unit)
    out: dict[str, Any] = {"unit": unit, "labels": "soft" if soft else "hard", "n": len(data),
                           "decided": 0, "equal_length": 0, "longer_chosen": None,
                           "mean_diff": None, "pearson": None, "spearman": None, "raw_rate": None,
                           "lc_rate": None, "slope": None, "sd": None}
    if not data:
        return out
    decided = [(la, lb, lab) for _, la, lb, _, lab in data if lab in ("a", "b")]
    unequal = [(la, lb, lab) for la, lb, lab in decided if la != lb]
    out["decided"], out["equal_length"] = len(decided), len(decided) - len(unequal)
    if unequal:
        out["longer_chosen"] = sum((la > lb) == (lab == "a") for la, lb, lab in unequal) / len(unequal)
    out["mean_diff"] = float(d.mean())
    out["pearson"], out["spearman"] = pearson(d, p), spearman(d, p)
    if not soft:  # the hard labels: 1 for A, 0 for B, ties left out
        keep = np.asarray([lab in ("a", "b") for *_, lab in data])
        d, p = d[keep], np.asarray([lab == "a" for *_, lab in data], dtype=np.float64)[keep]
    if p.size:
        out["raw_rate"] = float(p.mean())
    model = _length_model(d, p)
    if model is not None:
        b0, b1, sd = model
        out.update(lc_rate=_sigmoid(b0), slope=b1, sd=sd)
    return out


def debiased_labels(rows: Iterable[Mapping[str, Any]], unit: str = "chars") -> dict[str, float] | None:
    """Opt-in length-debiased soft labels, by pair id.

    Fit the length model of ``length_bias`` to the soft labels, then take out each pair's
    length term on the log-odds scale: ``p' = sigmoid(logit(p_a) - b1 * d / sd)``, which is
    the residual after the regression (``logit(p_a) - b0 - b1 * d / sd``) put back on the
    intercept ``b0`` and mapped back to a probability. The judge's position and its view of
    the content stay; what the length difference predicts goes. ``p_a`` is clipped to
    ``[EPS, 1 - EPS]`` first, so hard 0/1 labels move only a little. A pair of two answers of
    equal length keeps its (clipped) label. None when the model cannot be fitted (see ``length_bias``).
    """
    data, d, p = _length_rows(rows, unit)
    model = _length_model(d, p)
    if model is None:
        return None
    _, b1, sd = model
    return {rid: _sigmoid(_logit(pa) - b1 * (la - lb) / sd) for rid, la, lb, pa, _ in data}
