"""`cai review`: people check the judge. A local page over a run's judged pairs, hardest first
(``server``); each answer appended to ``RUN_DIR/human_labels.jsonl`` (``labels``); judge-vs-human
agreement on the run's own pairs (``agreement``); human labels in the exported pairs (``export``)."""
