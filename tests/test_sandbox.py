"""The template sandbox's caps hold: whatever a template builds ends in one line naming the file,
the line and the cap, in bounded memory (checked in a subprocess under an address-space limit),
and through the CLI as exit 2 with one line on stderr."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cai.cli import main
from cai.constitution import load_constitution
from cai.errors import EXIT_USAGE, TemplateError
from cai.templates import MAX_WORK, Templates

REPO = Path(__file__).resolve().parent.parent
S = "{% set s = 'a' * 999999 %}"
CAP = "over the limit of 1,000,000"
# (template line, a part of the one-line error)
CASES = [
    (S + "{{ [s] * 999999 }}", "a list of 1,000,002 characters, " + CAP),
    ("{% set s = 'a' * 99999 %}{{ [s] * 999999 }}", "a list of 100,001,899,998 characters, " + CAP),
    ("{{ 'a' * 10**10 }}", "a string of 10,000,000,000 characters, " + CAP),
    (S + "{{ s ~ s }}", "a string of 1,999,998 characters, " + CAP),
    (S + "{{ s + s }}", "a string of 1,999,998 characters, " + CAP),
    ("{% set l = ['\\x00' * 99999] * 9 %}{{ l|tojson }}", "a string of 5,399,982 characters, " + CAP),
    ("{% set l = ['\\x00' * 99999] * 9 %}{{ l|string }}", "a string of 3,600,000 characters, " + CAP),
    ("{% set l = ['\u00df' * 1000] * 900 %}{{ l|map('upper')|list }}", "a list of 1,000,500 characters, " + CAP),
    ("{{ range(100000)|map('center', 999999)|list }}", "a list of 2,000,000 characters, " + CAP),
    ("{{ range(100000)|map('center', 999999)|join }}", "a list of 2,000,000 characters, " + CAP),
    ("{% set l = ['a' * 100] * 9000 %}{{ l|join('x' * 1000) }}", "a string of 9,899,000 characters, " + CAP),
    ("{{ ('a' * 600000).replace('a', 'aa') }}", "a string of 1,200,000 characters, " + CAP),
    ("{% set s = 'a' * 400000 %}{{ '{}{}{}'.format(s, s, s) }}", "a string of 1,200,000 characters, " + CAP),
    ("{% set s = 'a' * 400000 %}{{ '%s%s%s' % (s, s, s) }}", "a list of 1,200,005 characters, " + CAP),
    ("{% set ns = namespace(s='a' * 500000) %}{{ [ns] * 10 }}", "a list of 5,000,060 characters, " + CAP),
    ("{% set s = 'a' * 999 %}{% set t %}{% for i in range(10000) %}{{ s }}{% endfor %}{% endset %}",
     "a string of 1,000,998 characters, " + CAP),
    ("{% macro m() %}{% for i in range(10000) %}{{ 'a' * 999 }}{% endfor %}{% endmacro %}{{ m()|length }}",
     "a string of 1,000,998 characters, " + CAP),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     f"over {MAX_WORK:,} steps (loop iterations and calls)"),
]
IDS = [c[0][-40:] for c in CASES]
CHILD = """
import json, resource, sys, tempfile
from pathlib import Path
from cai.errors import TemplateError
from cai.templates import Templates
from cai.constitution import Principle
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30) if hard < 0 else min(vm + (1 << 30), hard), hard))
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024  # KiB resident now
p = Principle(id="p", critique="c", revision="r", comparison="q")
out = []
for source in json.loads(sys.argv[1]):
    d = Path(tempfile.mkdtemp())
    (d / "critique.user.j2").write_text("Critique:\\n" + source + "\\n")
    try:
        Templates(d).messages("critique", conversation=[], response="x", principle=p, round=1)
        out.append("rendered")
    except TemplateError as e:
        out.append(str(e))
# the peak of this process image (VmHWM): ru_maxrss would count the parent's peak too, which a
# child inherits across fork and exec (a pytest process grown past 200 MB failed this test)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
grown = hwm - base
print(json.dumps({"errors": out, "grown_kib": grown}))  # the peak over the resident size before
"""


def test_every_cap_holds_in_bounded_memory():
    """All the cases in one process limited to 1 GiB more address space: each is one line with
    the file, line and cap, and the process grew by under 200 MB over all of them."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([c[0] for c in CASES])], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for (source, expect), err in zip(CASES, got["errors"], strict=True):
        assert "\n" not in err and "critique.user.j2:2: " in err and expect in err, (source, err)
    assert got["grown_kib"] < 200 * 1024, got["grown_kib"]


@pytest.fixture
def memory_guard() -> Iterator[None]:
    """At most 1 GiB more address space while the test runs: a cap that fails is a MemoryError,
    not a shared machine out of memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30) if hard < 0 else min(vm + (1 << 30), hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("source, expect", CASES, ids=IDS)
def test_cai_render_stops_with_one_line(source: str, expect: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], memory_guard: None):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "critique.user.j2").write_text("Critique:\n" + source + "\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    code = main(["render", "critique", "p.jsonl", "--templates", "t"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "critique.user.j2:2: " in err and expect in err, err


@pytest.mark.parametrize("source, expect", [
    ("{{ principle.critiqu }}", "principle (a Principle) has no attribute 'critiqu'; it has: id, critique, revision"),
    ("{{ conversation[0].text }}", "a dict has no attribute 'text'; it has: role, content"),
    ("{{ response.words }}", "response (a str) has no attribute 'words'"),
    ("{{ principle.examples[3] }}", "a tuple has no element 3"),
    ("{{ respnse }}", "'respnse' is undefined; variables available: conversation, principle, response, round"),
])
def test_an_undefined_name_says_what_is_there(source: str, expect: str, tmp_path: Path):
    (tmp_path / "critique.user.j2").write_text("Critique:\n" + source + "\n")
    with pytest.raises(TemplateError) as e:
        Templates(tmp_path).messages("critique", conversation=[{"role": "user", "content": "hi"}], response="r",
                                     principle=load_constitution().principles[0], round=1)
    assert "critique.user.j2:2: " + expect in str(e.value) and "cai.constitution" not in str(e.value)


def test_ordinary_loops_lists_and_macros_still_render(tmp_path: Path):
    (tmp_path / "critique.user.j2").write_text(
        "{% macro item(m) %}{{ m.role }}={{ m.content }}{% endmacro %}"
        "{% for m in conversation %}{{ loop.index }}:{{ item(m) }};{% endfor %} "
        "{{ [1, 2, 3]|map('string')|join('+') }} {{ {'a': 1}|tojson }} {{ (['x'] * 3)|list }} "
        "{% set t %}{% for i in range(3) %}{{ i }}{% endfor %}{% endset %}{{ t }} {{ range(3)|map('upper')|list }}")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (msg,) = Templates(tmp_path).messages("critique", conversation=conv, response="r", principle=None, round=1)
    assert msg["content"] == "1:user=hi;2:assistant=yo; 1+2+3 {\"a\": 1} ['x', 'x', 'x'] 012 ['0', '1', '2']"


def test_an_imported_templates_text_is_capped_and_its_macros_work(tmp_path: Path, memory_guard: None):
    (tmp_path / "lib.j2").write_text("top{% macro m() %}M{% endmacro %}")
    (tmp_path / "big.j2").write_text("{% for i in range(100000) %}{{ 'a' * 999 ~ i }}{% endfor %}")
    (tmp_path / "critique.user.j2").write_text("{% import 'lib.j2' as lib %}{% from 'lib.j2' import m %}"
                                               "{{ lib.m() }}{{ m() }}{{ lib }}")
    kw = {"conversation": [], "response": "r", "principle": None, "round": 1}
    assert Templates(tmp_path).messages("critique", **kw) == [{"role": "user", "content": "MMtop"}]
    (tmp_path / "critique.user.j2").write_text("Critique:\n{% import 'big.j2' as big %}\n")
    with pytest.raises(TemplateError, match=r"critique\.user\.j2:2: the template would make a string of 1,000,888 "):
        Templates(tmp_path).messages("critique", **kw)


def test_cai_render_names_an_undefined_attribute_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "critique.user.j2").write_text("Critique:\n{{ principle.critiqu }}\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    assert main(["render", "critique", "p.jsonl", "--templates", "t"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cai.constitution" not in err, err
    assert "critique.user.j2:2: principle (a Principle) has no attribute 'critiqu'; it has: id, critique" in err, err
