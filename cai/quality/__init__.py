"""The quality gates: text checks on revisions (flags), verdicts and rejects (gates), duplicates (dedup)."""
