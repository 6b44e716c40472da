"""What people read after a run: revisions.md, and the diagnostics report (report.json, report.html)."""
