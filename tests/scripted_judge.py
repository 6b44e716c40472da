"""The scripted judge the reward and best-of-n tests share (tests/test_reward.py,
tests/test_best_of_n.py, tests/test_trl_step.py).

A scripted response says its quality (``q=1.5 ...``); asked "A or B?", the judge answers with
P(A) = sigmoid(q(A) - q(B)) in either order, so a pair's soft label, a round robin's win rates and
the best and worst of a group are computed from the qualities alone, not through cai's code.
"""

from __future__ import annotations

import math
import re

from cai.types import Completion, Request


def body(text: str, tag: str) -> str:
    """The text between ``<tag>`` and ``</tag>`` lines of a judge prompt."""
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    assert m is not None, text
    return m.group(1)


def quality(text: str) -> float:
    """A scripted response's quality: ``q=1.5 ...`` says so; any other text a hash of its length."""
    m = re.match(r"q=(-?[\d.]+)", text.strip())
    return float(m.group(1)) if m else (len(text) % 7) - 3.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def user_text(req: Request) -> str:
    """The last user message of a request."""
    return str([m for m in req.messages if m["role"] == "user"][-1]["content"])


def is_pairwise(req: Request) -> bool:
    return "<response_a>" in user_text(req)


def judge_pair(req: Request) -> Completion:
    """The judge's answer to "A or B?": log-probs with P(A) = sigmoid(q(A) - q(B))."""
    user = user_text(req)
    p = sigmoid(quality(body(user, "response_a")) - quality(body(user, "response_b")))
    return Completion(["A"], logprobs=[{"A": math.log(p), " B": math.log(1 - p)}])
