"""cai.metrics: a judge's figures against people, calibration included, on hand-computed rows."""

from __future__ import annotations

import pytest

from cai.metrics import summarize


def row(p_a: float, human: str, label: str) -> dict:
    return {"p_a": p_a, "human": human, "label": label, "tie": label == "tie", "judgements": []}


def test_calibration_against_human_choices() -> None:
    rows = [row(0.9, "a", "a"), row(0.8, "b", "a"), row(0.3, "b", "b"), row(0.5, "a", "tie")]
    m = summarize(rows)
    # Brier: mean of (p_a - [human chose a])^2 = (0.01 + 0.64 + 0.09 + 0.25) / 4
    assert m["brier"] == pytest.approx(0.2475)
    # ECE, 10 equal bins: each row alone in its bin -> mean |p - outcome| = (0.1 + 0.8 + 0.3 + 0.5) / 4
    assert m["ece"] == pytest.approx(0.425)
    assert m["agreement"] == pytest.approx(2 / 3) and m["decided"] == 3
    assert sum(b["count"] for b in m["reliability"]) == 4


def test_no_human_labels_no_calibration() -> None:
    m = summarize([{"p_a": 0.7, "human": None, "label": "a", "judgements": []}])
    assert m["brier"] is None and m["ece"] is None and m["agreement"] is None
