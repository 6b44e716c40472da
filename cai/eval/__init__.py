"""Measures against people: the refusal detector and its XSTest evaluation (refusal, xstest), the naive
judge that eval-judge sets beside the real one (naive)."""
