"""cai: turn a written constitution into alignment training data (Constitutional AI / RLAIF)."""

__version__ = "0.1.0"
