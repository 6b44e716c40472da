"""`cai review`: people check the judge. A local page over a run's judged pairs, hardest first
(``server``); each answer appended to ``RUN_DIR/human_labels.jsonl`` (``labels``); judge-vs-human
agreement on the run's own pairs (``agreement``); human labels in the exported pairs (``export``)."""

from .agreement import review_diagnostics, summary_lines
from .export import MODES, apply_human_labels
from .labels import import_labels

__all__ = ["MODES", "apply_human_labels", "import_labels", "review_diagnostics", "summary_lines"]
