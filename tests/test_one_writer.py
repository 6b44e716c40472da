"""Never lose or double a row (issue 21): one writer per output folder, a duplicate id read back
is an error, a killed rerun leaves the last complete run.json readable, and a full disk ends the
run with one line and no cut final file.

Each test asserts the exit code, the one line on stderr, what is on disk, and that every id is
there exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.lock import LOCK_FILE

REPO = Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "Exception in callback", "Task was destroyed", "never retrieved")


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i:03d}", "prompt": f"Prompt {i}: tell me about {i}."}) + "\n")
    return path


def cai(tmp: Path, n: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cai.cli", "run", "--input", str(write_prompts(tmp / "p.jsonl", n)), "-o",
            str(out), "-b", "fake", "--revise-rounds", "1", "--label-principles", "1", "--no-progress", *extra]


def env(delay: float) -> dict[str, str]:
    e = {**os.environ, "CAI_FAKE_DELAY": str(delay), "PYTHONPATH": str(REPO)}
    e.pop("CAI_CACHE", None)
    return e


def ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def one_line(err: str) -> str:
    for bad in NOISE:
        assert bad not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def wait_for(cond, proc: subprocess.Popen, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def holds_lock(out: Path, pid: int) -> bool:
    try:
        return (out / LOCK_FILE).read_text().strip() == str(pid)
    except OSError:
        return False


def test_a_second_run_into_the_same_folder_is_refused_at_once(tmp_path: Path):
    out = tmp_path / "out"
    cmd = cai(tmp_path, 30, out)
    t0 = time.monotonic()
    with subprocess.Popen(cmd, cwd=REPO, env=env(1.5), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as first:
        wait_for(lambda: holds_lock(out, first.pid), first)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # started 1 s apart (once the first holds the folder)
        t1 = time.monotonic()
        second = subprocess.run(cmd, cwd=REPO, env=env(1.5), capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t1
        assert first.poll() is None, f"the first run ended before the second was refused ({took:.1f} s)"
        assert second.returncode == 2, second.stderr
        assert took < 15, took  # start-up alone (imports) takes seconds on a loaded 2-core box; waiting would not end
        line = one_line(second.stderr)
        assert str(out) in line and f"process {first.pid}" in line, line
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    want = [f"q{i:03d}" for i in range(30)]
    assert ids(out / "revisions.jsonl") == want
    assert sorted(ids(out / "labels.jsonl")) == want
    prefs = ids(out / "preferences.jsonl")
    assert len(prefs) == len(set(prefs))
    assert not [p.name for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]


@pytest.mark.integration  # kill -9 of a real `cai run` process, then a rerun (about 15 s)
def test_a_killed_run_leaves_no_stale_lock(tmp_path: Path):
    out = tmp_path / "out"
    cmd = cai(tmp_path, 10, out)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(2.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: holds_lock(out, proc.pid), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, cwd=REPO, env=env(0), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert ids(out / "revisions.jsonl") == [f"q{i:03d}" for i in range(10)]


def test_a_duplicate_id_in_an_output_is_an_error_naming_file_and_line(tmp_path: Path, capsys):
    from cai.cli import main

    out = tmp_path / "out"
    args = cai(tmp_path, 4, out)[3:]
    assert main(args) == 0
    revisions = out / "revisions.jsonl"
    rows = revisions.read_text().splitlines()
    revisions.write_text("\n".join([*rows, rows[1]]) + "\n")  # what two writers at once left behind
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(tmp_path / "export"), "--format", "jsonl"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{revisions}:5: id 'q001' again (first on line 2)" in line, line
    assert not (tmp_path / "export").exists()
    assert main(args) == 2  # resuming from it: the same error, nothing more written
    line = one_line(capsys.readouterr().err)
    assert f"{revisions}:5: id 'q001' again" in line, line
    assert len(revisions.read_text().splitlines()) == 5


@pytest.mark.integration  # kill -9 of a real `cai run` rerun mid-write (about 10 s)
def test_a_killed_rerun_leaves_the_last_complete_manifest_readable(tmp_path: Path, capsys):
    from cai.cli import main

    out = tmp_path / "out"
    assert main(cai(tmp_path, 5, out)[3:]) == 0
    before = json.loads((out / "run.json").read_text())
    rerun = subprocess.Popen(cai(tmp_path, 10, out), cwd=REPO, env=env(5.0), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def marked() -> bool:
        try:
            return "running" in json.loads((out / "run.json").read_text())
        except (OSError, ValueError):
            return False

    wait_for(marked, rerun)
    time.sleep(0.3)
    os.kill(rerun.pid, signal.SIGKILL)
    rerun.wait()
    after = json.loads((out / "run.json").read_text())
    assert after["running"]["pid"] == rerun.pid
    assert {k: v for k, v in after.items() if k != "running"} == before  # the last complete manifest, whole
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(tmp_path / "export"), "--format", "jsonl"]) == 0, \
        capsys.readouterr().err
    sft = [json.loads(x) for x in (tmp_path / "export" / "data" / "train.jsonl").read_text().splitlines()] \
        if (tmp_path / "export" / "data" / "train.jsonl").exists() else None
    assert (tmp_path / "export" / "README.md").exists()
    if sft is not None:
        assert len(sft) == len({json.dumps(r, sort_keys=True) for r in sft})


@pytest.fixture
def small_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {e}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True, timeout=30)


def test_a_full_disk_ends_the_run_with_one_line_and_no_cut_final_file(tmp_path: Path, small_disk: Path):
    out = small_disk / "out"
    cmd = cai(tmp_path, 300, out, "--cache", str(tmp_path / "cache.sqlite"))
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=env(0), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert "No space left on device" in line and str(out) in line, line
    assert time.monotonic() - t0 < 120
    for name in ("revisions.jsonl", "labels.jsonl", "preferences.jsonl"):
        assert not (out / name).exists(), name  # never a final file cut short
    part = out / "revisions.jsonl.part"
    rows = part.read_bytes().split(b"\n")
    got = [json.loads(x)["id"] for x in rows[:-1]]  # the last line may be cut: a rerun trims it
    assert len(got) == len(set(got)) and got == [f"q{i:03d}" for i in range(len(got))]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "running"
