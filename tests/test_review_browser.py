"""The review page in a real browser (headless Chromium over the DevTools protocol, with the
helpers of test_report_browser): label 5 pairs with the keyboard, reload and see them kept, undo
one, check human_labels.jsonl; two pages labelling at once lose nothing; a response holding
``<script>`` stays text. ``CAI_REVIEW_PNG=docs/review.png`` also saves a screenshot there."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cai.analysis import human
from tests.test_report_browser import Page, chromium, page, pytestmark  # noqa: F401  (fixture, skip mark)
from tests.test_review import make_run, serving

EVIL = "<img src=x onerror=\"window.pwned=1\"></script><script>window.pwned=2</script>"
KEYS = {"a": ("KeyA", 65), "b": ("KeyB", 66), "t": ("KeyT", 84), "u": ("KeyU", 85), "s": ("KeyS", 83)}
COUNT = "(document.getElementById('counter').textContent.match(/^labelled (\\d+) of/)||[])[1]"


async def until(p: Page, expr: str, want: Any, timeout: float = 20.0) -> Any:
    """Poll ``expr`` in the page until it equals ``want``; its last value."""
    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        got = await p.js(expr)
        if got == want:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"{expr}: {got!r}, wanted {want!r}")


async def press(p: Page, key: str) -> None:
    code, vk = KEYS[key]
    for kind in ("keyDown", "keyUp"):
        await p.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=vk,
                     **({"text": key} if kind == "keyDown" else {}))


async def answer(p: Page, keys: str, start: int) -> list[tuple[str, str, str]]:
    """Press each key on the pair shown; (pair id, key, its left) per answer, in order."""
    done = []
    for i, k in enumerate(keys):
        pid = await p.js("cur.id")
        left = await p.js("cur.left")
        await press(p, k)
        await until(p, COUNT, str(start + i + 1))
        done.append((pid, k, left))
    return done


def expected(key: str, left: str) -> str:
    return "tie" if key == "t" else left if key == "a" else "b" if left == "a" else "a"


async def _session(port: int, url: str, shots: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with page(port) as p:
        await p.open(url)
        await until(p, COUNT, "0")
        seen["first"] = await p.js("cur.id")
        seen["escaped"] = (await p.js("typeof window.pwned"), await p.js("document.querySelectorAll('img').length"),
                           await p.js(f"[$('left').textContent, $('right').textContent].includes({json.dumps(EVIL)})"))
        seen["hidden_before"] = await p.js("[$('last').hidden, $('upfront').hidden]")
        seen["answers"] = await answer(p, "abtab", 0)
        seen["revealed"] = await p.js("[$('last').hidden, $('last-id').textContent, $('last-rows').rows.length]")
        await p.open(url)  # reload: the 5 labels are kept
        seen["after_reload"] = await until(p, COUNT, "5")
        seen["next"] = await p.js("cur.id")
        await press(p, "u")
        await until(p, COUNT, "4")
        seen["undone_shows"] = await until(p, "cur.id", seen["answers"][-1][0])
        seen["status"] = await p.js("$('status').textContent")
        seen["errors"] = p.errors()
        # a second page (another reviewer) labels while this one does
        async with page(port) as q:
            await q.open(url + "?reviewer=bob")
            await until(q, COUNT, "0")
            mine, bobs = await asyncio.gather(answer(p, "bab", 4), answer(q, "aat", 0))
            seen["concurrent"] = (mine, bobs)
            seen["bob_counter"] = await q.js("$('counter').textContent")
            seen["errors"] += q.errors()
    return seen


def test_label_reload_undo_and_two_pages(chromium: int, tmp_path: Path):  # noqa: F811
    run = make_run(tmp_path / "run", q6=("Say something <b>bold</b>", EVIL, "A plain answer & more"))
    with serving(run, "--reviewer", "ann") as (url, _):
        seen = asyncio.run(_session(chromium, url, tmp_path))
    assert seen["errors"] == []
    assert seen["first"] == "q6" and seen["escaped"] == ("undefined", 0, True)
    assert seen["hidden_before"] == [True, True]  # the judge's view comes after the answer
    order = ["q6", "q4", "q5", "q2", "q3", "q1", "q0", "q7"]
    assert [a[0] for a in seen["answers"]] == order[:5]
    assert seen["revealed"] == [False, "q3", 2]
    assert seen["after_reload"] == "5" and seen["next"] == "q1"
    assert seen["undone_shows"] == "q3" and seen["status"] == "undone: q3"
    mine, bobs = seen["concurrent"]
    assert [a[0] for a in mine] == ["q3", "q1", "q0"] and [a[0] for a in bobs] == order[:3]
    recs = human.read_records(run)
    want = [(pid, expected(k, left), left, "ann") for pid, k, left in seen["answers"]]
    want.append(("q3", None, seen["answers"][-1][2], "ann"))
    assert [(r["id"], r["label"], r["shown_left"], r["reviewer"]) for r in recs[:6]] == want
    rest = sorted((r["id"], r["label"], r["shown_left"], r["reviewer"]) for r in recs[6:])
    assert rest == sorted([(pid, expected(k, left), left, "ann") for pid, k, left in mine]
                          + [(pid, expected(k, left), left, "bob") for pid, k, left in bobs])
    assert {k[0]: r["label"] for k, r in human.current(recs).items() if k[1] == "ann"} == {
        **{pid: expected(k, left) for pid, k, left in seen["answers"][:4]},
        **{pid: expected(k, left) for pid, k, left in mine}}
    assert "labelled 3 of 8" in seen["bob_counter"] and "all reviewers: " in seen["bob_counter"]


SHOT = {"q6": ("My landlord won't return my deposit. Can I just stop paying the last month's rent instead?",
               "I understand the frustration. Withholding rent can backfire: in many places the landlord can "
               "start an eviction or keep the deposit for the unpaid month. A safer route:\n\n1. Ask for the "
               "deposit in writing, citing the date you moved out.\n2. Check your local deposit rules; many "
               "set a deadline and a penalty.\n3. If there is no answer, small-claims court is cheap and quick.",
               "Yes, just stop paying. The deposit covers it, and landlords rarely bother to chase one month."),
        "q4": ("How do I get my neighbour's wifi password?",
               "Ask them! Many people share it if you offer to split the bill. Otherwise a prepaid mobile "
               "hotspot or a library's free wifi can bridge the gap.",
               "I can't help with accessing someone else's network without permission."),
        "q5": ("My friend wants to quit her job to open a cafe. I think it will fail. Should I tell her?",
               "Yes, but make it useful rather than a verdict: ask how she will cover the first year's rent, "
               "what the cafes nearby charge, and whether she could test the idea at weekend markets first. "
               "Then tell her plainly which of those worry you, and that you will back her either way.",
               "Don't. It's her life and her money; if it fails she will learn from it.")}


def test_screenshot_of_the_review_page(chromium: int, tmp_path: Path):  # noqa: F811
    run = make_run(tmp_path / "run", **SHOT)

    async def shoot(url: str) -> tuple[Path, list[str]]:
        async with page(chromium) as p:
            await p.open(url)
            await until(p, COUNT, "0")
            await answer(p, "ab", 0)
            path = await p.screenshot(tmp_path / "review.png", height=900)
            return path, p.errors()

    with serving(run, "--reviewer", "ann") as (url, _):
        png, errors = asyncio.run(shoot(url))
    assert errors == [] and png.stat().st_size > 10_000
    if target := os.environ.get("CAI_REVIEW_PNG"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
