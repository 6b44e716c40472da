"""The stages, and a principle's few-shot examples as chat turns (the rules: ``cai.templates``' doc)."""

from __future__ import annotations

from typing import Any

from jinja2 import nodes

ROLES = ("system", "user", "assistant")
STAGES = ("generate", "critique", "revise", "judge", "judge_cot", "judge_cot_answer")
JUDGE_STAGES = ("judge", "judge_cot", "judge_cot_answer")
# The context a judge example replaces with its own (with the principle, all that its turns see
# in the judge and judge_cot stages' contexts).
JUDGE_EXAMPLE_CTX = frozenset({"principle", "conversation", "response_a", "response_b"})
# The context a revise template that continues the critique's chat does without.
REVISE_CONTEXT = frozenset({"conversation", "response", "critique"})


def mentions_context(node: nodes.Node) -> bool:
    """Whether a template reads any of the variables that show the conversation under revision."""
    return any(n.name in REVISE_CONTEXT and n.ctx == "load" for n in node.find_all(nodes.Name))


def mentions_examples(node: nodes.Node) -> bool:
    """Whether a template reads ``x.examples`` / ``x.judge_examples`` (or ``x['examples']``)."""
    names = ("examples", "judge_examples")
    return any(getattr(n, "attr", None) in names or (isinstance(c := getattr(n, "arg", None), nodes.Const)
                                                     and c.value in names)
               for n in node.find_all((nodes.Getattr, nodes.Getitem)))


def example_turns(tpl: Any, stage: str, p: Any, ctx: dict[str, Any]) -> list[tuple[str, str]]:
    """The (role, text) turns of principle ``p``'s examples for ``stage``, rendered by ``tpl`` (a Templates)."""
    turns: list[tuple[str, str]] = []
    if stage in ("critique", "revise"):
        for ex in getattr(p, "examples", ()):
            turns += [("user", ex.prompt), ("assistant", ex.response),
                      ("user", p.critique), ("assistant", ex.critique)]
            if stage == "revise" or tpl.revision_continues():
                turns += [("user", p.revision), ("assistant", ex.revision)]
    elif stage in JUDGE_STAGES:
        cot = stage != "judge"
        for ex in getattr(p, "judge_examples", ()):
            if cot and not ex.reasoning:
                continue
            demo = {**ctx, "conversation": [{"role": "user", "content": ex.prompt}],
                    "response_a": ex.response_a, "response_b": ex.response_b}
            user = tpl.render_text(stage, "user", **demo) or ""
            if cot:
                demo["reasoning"] = ex.reasoning
            prefix = tpl.render_text("judge_cot_answer" if cot else "judge", "assistant", **demo) or ""
            turns += [("user", user), ("assistant", answer_text(prefix, ex.answer))]
    return turns


def answer_text(prefix: str, answer: str) -> str:
    """A judge example's answer turn: the prefix the model continues, then the letter
    (closing the parenthesis when the prefix opens one: "The answer is: (A)")."""
    if prefix.endswith("("):
        return f"{prefix}{answer})"
    return f"{prefix} {answer}".strip()
