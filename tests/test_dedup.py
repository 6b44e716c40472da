"""Exact and near-duplicate prompts, and decontamination against an evaluation file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cai.errors import InputError
from cai.quality.dedup import Decontaminator, find_duplicates, normalize, shingles

LONG = ("How do I make a strong password that is easy for me to remember but hard for other people "
        "to guess when they try")
# The same sentence with its last word changed: 21 of 23 word bigrams shared, Jaccard 0.91.
LONG_NEAR = LONG.rsplit(" ", 1)[0] + " hard"
# A third of the words changed: Jaccard of word bigrams about 0.45.
LONG_HALF = ("How do I make a strong password that is easy for me to remember when I am tired "
             "and cannot think clearly at night")


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(normalize(a)), shingles(normalize(b))
    return len(sa & sb) / len(sa | sb)


def test_normalize_ignores_case_whitespace_and_punctuation() -> None:
    assert normalize("  Hello,\tWORLD!!  What's   up? ") == "hello world whats up"
    assert normalize("don\u2019t") == normalize("dont") == "dont"
    assert normalize("?!...") == ""


def test_exact_and_near_duplicates_map_to_the_first_occurrence() -> None:
    items = [
        ("a", "Hello, world!"),
        ("b", LONG),
        ("c", "  hello   WORLD "),
        ("d", "Something else entirely, about cooking pasta."),
        ("e", LONG_NEAR),
        ("f", LONG.upper() + "?"),
        ("g", LONG_HALF),
    ]
    assert jaccard(LONG, LONG_NEAR) > 0.9 and jaccard(LONG, LONG_HALF) < 0.5
    assert find_duplicates(items) == {"c": ("a", "exact"), "e": ("b", "near"), "f": ("b", "exact")}


def test_order_decides_which_copy_is_kept() -> None:
    assert find_duplicates([("x", LONG_NEAR), ("y", LONG)]) == {"y": ("x", "near")}
    assert find_duplicates([("y", LONG), ("x", LONG_NEAR)]) == {"x": ("y", "near")}


def test_a_copy_of_a_dropped_near_duplicate_points_at_the_kept_item() -> None:
    dups = find_duplicates([("keep", LONG), ("near", LONG_NEAR), ("copy", LONG_NEAR.lower())])
    assert dups == {"near": ("keep", "near"), "copy": ("keep", "near")}


def test_threshold_is_respected() -> None:
    j = jaccard(LONG, LONG_HALF)
    assert 0.35 < j < 0.55
    assert find_duplicates([("a", LONG), ("b", LONG_HALF)], threshold=0.8) == {}
    assert find_duplicates([("a", LONG), ("b", LONG_HALF)], threshold=0.25) == {"b": ("a", "near")}
    # Jaccard 0.91 passes 0.8 but not 0.99 (verified on the MinHash estimate, not just LSH buckets)
    assert find_duplicates([("a", LONG), ("b", LONG_NEAR)], threshold=0.99) == {}


def test_short_texts_and_determinism() -> None:
    items = [(str(i), t) for i, t in enumerate(["Hi", "hi!", "Hello", "Hi there", "hi  THERE.", "", "..."])]
    expected = {"1": ("0", "exact"), "4": ("3", "exact"), "6": ("5", "exact")}
    assert find_duplicates(items) == expected
    assert find_duplicates(iter(items)) == expected  # any iterable, streamed


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="twice"):
        find_duplicates([("a", "one"), ("a", "two")])
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates([("a", "one")], threshold=0.0)


# --- decontamination -------------------------------------------------------------------------


def test_decontaminator_from_jsonl_detects_the_column(tmp_path: Path) -> None:
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(json.dumps({"id": i, "question": q}) for i, q in enumerate([LONG, "What is 2+2?"])) + "\n")
    d = Decontaminator.from_file(f)
    assert len(d) == 2
    assert d.hit("what is 2 + 2") == "What is 2+2?"  # punctuation is ignored
    assert d.hit("What is 3+3?") is None
    assert d.hit("What is 2+2") == "What is 2+2?"
    assert d.check("WHAT IS 2+2?") == ("What is 2+2?", "exact")
    assert d.hit(LONG_NEAR) == LONG
    assert d.check(LONG_NEAR) == (LONG, "near")
    assert d.hit(LONG_HALF) is None
    assert d.hit("Tell me a story about a dragon.") is None


def test_decontaminator_formats(tmp_path: Path) -> None:
    csv = tmp_path / "eval.csv"
    csv.write_text(f'prompt,answer\n"{LONG}",x\n')
    txt = tmp_path / "eval.txt"
    txt.write_text(f"\n{LONG}\nsecond prompt here\n\n")
    arr = tmp_path / "eval.json"
    arr.write_text(json.dumps([{"input": LONG}, {"input": None}]))
    msgs = tmp_path / "chat.jsonl"
    msgs.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be nice."},
                                           {"role": "user", "content": LONG}]}) + "\n")
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "not this one", "query": LONG}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_file = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"instruction": [LONG, "b"]}), pq_file)
    for path, column in [(csv, None), (txt, None), (arr, None), (msgs, None), (own, "query"), (pq_file, None)]:
        assert Decontaminator.from_file(path, column).hit(LONG_NEAR) == LONG, path
    assert len(Decontaminator.from_file(txt)) == 2


@pytest.mark.parametrize(
    ("name", "content", "column", "says"),
    [
        ("missing.jsonl", None, None, "file not found"),
        ("eval.xlsx", "x", None, "unsupported file type"),
        ("empty.jsonl", "", None, "no evaluation prompts"),
        ("blank.txt", "\n  \n", None, "no evaluation prompts"),
        ("empty.json", "[]", None, "no evaluation prompts"),
        ("nocol.jsonl", '{"answer": "4"}\n', None, "no text column"),
        ("wrongcol.jsonl", '{"prompt": "hi"}\n', "query", "no column 'query'"),
        ("partial.jsonl", '{"prompt": "hi"}\n{"text": "yo"}\n', None, "no column 'prompt'"),
        ("badline.jsonl", '{"prompt": "hi"}\n{oops\n', None, "invalid JSON"),
        ("bad.json", '[{"prompt": "hi"},', None, "invalid JSON"),
        ("latin1.txt", b"caf\xe9\n", None, "not UTF-8"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', None, "not UTF-8"),
        ("dict.jsonl", '{"prompt": {"a": 1}}\n', None, "holds a dict"),
        ("bad.parquet", "not parquet", None, "Parquet"),
    ],
)
def test_bad_evaluation_files_give_one_line_input_errors(
    tmp_path: Path, name: str, content: str | bytes | None, column: str | None, says: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        Decontaminator.from_file(path, column)
    msg = str(err.value)
    assert says in msg and name in msg and "\n" not in msg


def test_a_folder_is_not_an_evaluation_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        Decontaminator.from_file(tmp_path)


def _templated(i: int) -> str:
    return f"Question {i}: how should I handle situation number {i} with my neighbour's dog?"


def test_candidates_are_lsh_query_and_the_check_is_the_minhash_estimate() -> None:
    """The index's own candidate union and verification give what datasketch's query() and
    MinHash.jaccard() give, on templated prompts (a bucket holding a share of every item)."""
    import random

    from datasketch import MinHashLSH

    from cai.quality.dedup import _Index

    index = _Index(0.8, 128)
    lsh = MinHashLSH(threshold=0.7, num_perm=128)  # the bands the index uses (LSH_MARGIN below 0.8)
    assert (lsh.b, lsh.r) == (index.bands, index.rows_per_band)
    kept: dict[int, np.ndarray] = {}
    rng = random.Random(0)
    for i in range(1500):
        text = _templated(i) if i % 3 else _templated(rng.randrange(max(1, i))) + " please"
        norm, mh = index._sketch(text)
        assert mh is not None
        assert index._candidates(mh) == set(lsh.query(mh))
        hits = [row for row in lsh.query(mh)
                if (kept[row] == mh.hashvalues).mean() >= index.threshold]
        found = index._match(norm, mh)
        if found is None or found[1] == "near":
            assert found == ((index._keys[min(hits)], "near") if hits else None)
        if found is None:
            kept[len(index)] = mh.hashvalues.copy()
            lsh.insert(len(index), mh, check_duplication=False)
            index._add(f"k{i}", norm, mh)
    assert len(index) < 1500  # some near duplicates were found


def test_templated_prompts_are_all_kept() -> None:
    items = [(str(i), _templated(i)) for i in range(3000)]
    assert find_duplicates(items) == {}
    assert find_duplicates([*items, ("again", _templated(7).upper())]) == {"again": ("7", "exact")}


def test_minhash_is_datasketchs_affine32_and_the_bands_its_lsh() -> None:
    """cai's MinHash (no datasketch import: its LSH imports scipy) gives datasketch's hash values,
    and the bands kept for cai's thresholds are the ones MinHashLSH picks."""
    import random

    from datasketch import MinHash as Reference
    from datasketch import MinHashLSH

    from cai.quality.dedup import LSH_BANDS, SCHEME, SEED, MinHash, lsh_bands

    for (threshold, num_perm), bands in LSH_BANDS.items():
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert (lsh.b, lsh.r) == bands == lsh_bands(threshold, num_perm)
    lsh = MinHashLSH(threshold=0.5, num_perm=64)
    assert lsh_bands(0.5, 64) == (lsh.b, lsh.r)  # not in the table: asked of datasketch
    rng = random.Random(0)
    for num_perm in (16, 128, 300):
        mine, ref = MinHash(num_perm, SEED), Reference(num_perm=num_perm, seed=SEED, scheme=SCHEME)
        for _ in range(200):
            items = [f"w{rng.randrange(500)} \u00e9{rng.randrange(50)}".encode() for _ in range(rng.randrange(1, 60))]
            ref.clear()
            ref.update_batch(items)
            mine.fill(items)
            assert mine.hashvalues.dtype == ref.hashvalues.dtype
            assert np.array_equal(mine.hashvalues, ref.hashvalues)


def test_the_gate_does_not_import_scipy() -> None:
    """Start-up: the near-duplicate gate needs neither datasketch nor scipy (0.4 s of imports)."""
    import subprocess
    import sys

    code = ("import sys; from cai.quality.dedup import find_duplicates; "
            "find_duplicates([('a', 'one two three'), ('b', 'one two three four')]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'datasketch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
