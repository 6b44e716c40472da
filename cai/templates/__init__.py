"""Jinja2 prompt templates, rendered in a capped sandbox (``sandbox``) with strict undefined names.

A stage's prompt is up to three files: ``{stage}.system.j2`` (optional), ``{stage}.user.j2`` and
``{stage}.assistant.j2`` (optional: a prefix the model continues, such as "The answer is: ("). A
folder given with ``--templates DIR`` is searched first, then the shipped ``prompts/``, so a user
can override one file and keep the rest.

Few-shot examples are real chat turns between the system message and the live request (the CAI
paper's and Hugging Face's open CAI recipe's format): critique: user ``example.prompt``, assistant
``example.response``, user ``principle.critique``, assistant ``example.critique``; revise: the same,
then user ``principle.revision``, assistant ``example.revision``; the judge stages: per
``principle.judge_examples`` (the CoT stages: those with a ``reasoning``), user the stage's own user
template rendered on the example, assistant the answer prefix (``judge.assistant.j2``, or
``judge_cot_answer.assistant.j2`` with the reasoning) and the letter.

When the revise templates read none of ``conversation``, ``response`` and ``critique`` (the shipped
``revise.user.j2``), a revision continues the critique's chat, as in the CAI paper: the critique
request exactly as sent (its example turns then carry each example's revision too), the critique as
the assistant's turn, then the revision request; so an engine's prefix cache reuses the whole
critique. A revise template that shows the context itself (cai 0.1's) is sent on its own, after the
revise example turns. A stage whose templates read ``principle.examples`` or
``principle.judge_examples`` themselves (cai 0.x's) gets no example turns: it sends what it sent.
"""

from .examples import JUDGE_STAGES, ROLES, STAGES, answer_text
from .fences import FENCE_NAMES, fenced, fold, format_conversation, neutralise_tags, with_system
from .render import Templates
from .sandbox import MAX_CHARS, MAX_INT_BITS, MAX_RANGE, MAX_WORK, CappedSandbox

__all__ = ["FENCE_NAMES", "JUDGE_STAGES", "MAX_CHARS", "MAX_INT_BITS", "MAX_RANGE", "MAX_WORK", "ROLES", "STAGES",
           "CappedSandbox", "Templates", "answer_text", "fenced", "fold", "format_conversation", "neutralise_tags",
           "with_system"]
