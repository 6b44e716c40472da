"""Jinja2 prompt templates, rendered in a capped sandbox (``sandbox``) with strict undefined names.

A stage's prompt is made of up to three files in a templates folder:
``{stage}.system.j2`` (optional), ``{stage}.user.j2`` and ``{stage}.assistant.j2`` (optional:
a prefix the model continues, such as "The answer is: ("). A user folder given with
``--templates DIR`` is searched first, then the templates shipped with cai, so a user can
override one file and keep the rest.

Few-shot examples. A principle's examples are sent as real chat turns between the system
message and the live request that the stage's templates render (the CAI paper's and Hugging
Face's open CAI recipe's format, prompt included):

- critique: user ``example.prompt``, assistant ``example.response``, user the critique request
  (``principle.critique``), assistant ``example.critique`` (and the revise stage's two more
  turns when the revision continues the critique's chat, below);
- revise: the same four turns, then user the revision request (``principle.revision``),
  assistant ``example.revision``;
- judge, judge_cot, judge_cot_answer: for each of ``principle.judge_examples``, user the stage's
  own user template rendered on the example (its prompt, response_a, response_b), assistant
  the answer prefix (``judge.assistant.j2``, or ``judge_cot_answer.assistant.j2`` with the
  example's reasoning for the CoT stages) followed by the answer letter. The CoT stages use
  only the examples that have a ``reasoning``.

How a revision is asked. When the revise templates read none of ``conversation``, ``response``
and ``critique`` (the shipped ``revise.user.j2`` shows only the revision request), the revision
continues the critique's chat, as in the CAI paper: the critique request exactly as sent, the
critique as the assistant's turn, then the revision request. The critique's example turns then
carry each example's revision too, so that a revision request begins with every token of its
critique request and an engine's prefix cache reuses the whole critique (prompt and answer).
A revise template that shows the context itself (cai 0.1's did) is sent on its own, after the
revise example turns, as before.

A stage whose templates use ``principle.examples`` or ``principle.judge_examples`` themselves
(as the templates of cai 0.x did) renders the examples its own way and gets no example turns,
so that an older template folder keeps sending exactly what it sent.
"""

from .examples import JUDGE_STAGES, ROLES, STAGES, answer_text
from .fences import FENCE_NAMES, fenced, fold, format_conversation, neutralise_tags, with_system
from .render import Templates
from .sandbox import MAX_CHARS, MAX_INT_BITS, MAX_RANGE, MAX_WORK, CappedSandbox

__all__ = ["FENCE_NAMES", "JUDGE_STAGES", "MAX_CHARS", "MAX_INT_BITS", "MAX_RANGE", "MAX_WORK", "ROLES", "STAGES",
           "CappedSandbox", "Templates", "answer_text", "fenced", "fold", "format_conversation", "neutralise_tags",
           "with_system"]
