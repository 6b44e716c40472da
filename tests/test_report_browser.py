"""report.html in a real browser: headless Chromium driven over the DevTools protocol.

Chromium starts with ``--remote-debugging-port=0`` (it picks a free port and writes it to
``DevToolsActivePort`` in its profile folder); a tiny client (aiohttp's websocket client, a cai
dependency) enables the Runtime, Log and Page domains, opens the page from ``file://``, and
collects every console error, uncaught exception and error log entry while it checks that the
plots and the table render, types into the filter box (``Input.insertText``, as a keyboard
would), picks a principle, and takes a screenshot (PNG under ``tmp_path``; set
``CAI_REPORT_PNG=docs/report.png`` to also save the top of the page there, as the README's).
Skipped when ``/usr/bin/chromium`` is absent (``scripts/install_browser.sh`` installs it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from cai.report.html import write_report
from tests.test_report import cli_folders, realistic_run, text_problems, write_run

CHROMIUM = os.environ.get("CAI_CHROMIUM") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-allow-origins=*"]
WIDTH = 1280
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)),
                                reason=f"no Chromium at {CHROMIUM} (run scripts/install_browser.sh as root)")


class Page:
    """One page over a DevTools websocket: commands by id, events kept in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.new_event = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.waiting:
                self.waiting.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)
                self.new_event.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, TIMEOUT)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def js(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_event(self, method: str, since: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(e["method"] == method for e in self.events[since:]):
            self.new_event.clear()
            await asyncio.wait_for(self.new_event.wait(), max(deadline - time.monotonic(), 0.01))

    async def open(self, url: str) -> None:
        mark = len(self.events)
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired", mark)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    async def screenshot(self, path: Path, height: int | None = None) -> Path:
        """A PNG of the whole page (or its top ``height`` pixels) at ``WIDTH`` pixels wide."""
        full = await self.js("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": min(height or full, full), "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def _port(profile: Path, proc: subprocess.Popen[bytes]) -> int:
    """The DevTools port Chromium picked (it writes it to its profile folder)."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        with suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.05)
    raise RuntimeError("chromium did not open its DevTools port in time")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A headless Chromium of our own for this module; yields its DevTools port."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = (profile.parent / "chromium.log").open("wb")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield _port(profile, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@asynccontextmanager
async def page(port: int) -> AsyncIterator[Page]:
    """A fresh tab with the Runtime, Log and Page domains on, closed afterwards."""
    import aiohttp

    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        try:
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                p = Page(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await p.send(f"{domain}.enable")
                await p.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1,
                             mobile=False)
                try:
                    yield p
                finally:
                    p.reader.cancel()
        finally:
            async with http.get(f"http://127.0.0.1:{port}/json/close/{target['id']}") as r:
                await r.read()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


VISIBLE_ROWS = "document.querySelectorAll('#rows tbody tr').length"


async def _check_report(port: int, html: Path, shots: Path) -> dict[str, Any]:
    async with page(port) as p:
        await p.open(html.as_uri())
        seen: dict[str, Any] = {
            "svgs": await p.js("document.querySelectorAll('svg.plot').length"),
            "rects": await p.js("document.querySelectorAll('svg.plot rect, svg.plot circle').length"),
            "cards": await p.js("document.querySelectorAll('.card').length"),
            "rows": await p.js(VISIBLE_ROWS),
            "total": await p.js("JSON.parse(document.getElementById('cai-rows').textContent).length"),
            "count": await p.js("document.getElementById('count').textContent"),
        }
        await p.screenshot(shots / "report.png", height=3000)
        # type a word of one row's prompt into the filter box
        word = await p.js("JSON.parse(document.getElementById('cai-rows').textContent)[0].id")
        await p.js("document.getElementById('filter').focus()")
        await p.send("Input.insertText", text=word)
        seen["filtered"] = await p.js(VISIBLE_ROWS)
        seen["filtered_text"] = await p.js("document.querySelector('#rows tbody').textContent")
        seen["word"] = word
        await p.js("const f=document.getElementById('filter');f.value='';f.dispatchEvent(new Event('input'))")
        seen["cleared"] = await p.js(VISIBLE_ROWS)
        # pick the last principle in the dropdown
        seen["principle"] = await p.js(
            "(()=>{const s=document.getElementById('principle');s.value=s.options[s.options.length-1].value;"
            "s.dispatchEvent(new Event('change'));return s.value})()")
        seen["by_principle"] = await p.js(VISIBLE_ROWS)
        seen["all_have_it"] = await p.js(
            "Array.from(document.querySelectorAll('#rows tbody tr')).every(tr=>tr.cells[0].textContent"
            f".includes({json.dumps(seen['principle'][2:])}))")  # values are r:ID (revised by), j:ID (judged by)
        # expand one row's rounds
        seen["rounds_open"] = await p.js(
            "(()=>{const d=document.querySelector('#rows details');if(!d)return null;d.open=true;"
            "return d.querySelectorAll('.round').length})()")
        png = os.environ.get("CAI_REPORT_PNG")
        if png:
            await p.js("const s=document.getElementById('principle');s.value='';s.dispatchEvent(new Event('change'))")
            await p.screenshot(shots / "top.png", height=1650)
            Path(png).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots / "top.png", png)
        seen["errors"] = p.errors()
        return seen


def test_report_page_in_chromium(chromium: int, tmp_path: Path):
    try:
        run = realistic_run(tmp_path / "run")
    except pytest.skip.Exception:
        run = write_run(tmp_path / "run")  # the pipeline is moving: the small written run will do
    _, html = write_report(run)
    seen = asyncio.run(_check_report(chromium, html, tmp_path))
    assert seen["errors"] == []
    assert seen["svgs"] >= 5 and seen["rects"] > 50 and seen["cards"] >= 12
    assert seen["rows"] == min(seen["total"], 100) > 10 and "of" in seen["count"]
    assert 0 < seen["filtered"] < seen["rows"] and seen["word"] in seen["filtered_text"]
    assert seen["cleared"] == seen["rows"]
    assert 0 < seen["by_principle"] < seen["rows"] and seen["all_have_it"] is True
    assert seen["rounds_open"] is None or seen["rounds_open"] >= 1
    w, h = _png_size(tmp_path / "report.png")
    assert w == 1280 and 1500 < h <= 3000


def test_hostile_rows_stay_text(chromium: int, tmp_path: Path):
    run = write_run(tmp_path / "run")
    evil = "<img src=x onerror=\"window.pwned=1\"></script><script>window.pwned=2</script>"
    rows = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()]
    rows[0]["initial_response"] = evil
    rows[0]["rounds"][0]["critique"] = evil
    rows[0]["gates"] = [evil]
    (run / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, html = write_report(run)

    async def check() -> tuple[Any, ...]:
        async with page(chromium) as p:
            await p.open(html.as_uri())
            await p.js("document.querySelectorAll('#rows details').forEach(d=>d.open=true)")
            return (await p.js("typeof window.pwned"), await p.js("document.querySelectorAll('img').length"),
                    await p.js(f"document.querySelector('#rows tbody').textContent.includes({json.dumps(evil)})"),
                    await p.js(VISIBLE_ROWS), p.errors())

    pwned, imgs, shown, n, errors = asyncio.run(check())
    assert (pwned, imgs, shown, n, errors) == ("undefined", 0, True, 8, [])


def test_revise_only_label_only_and_full_pages_tell_the_truth(chromium: int, tmp_path: Path):
    """Screenshots of the three kinds of folder; none shows n/a, a ? in its header or an empty
    sentence, as the browser renders it (CAI_REPORT_SHOTS=DIR keeps the PNGs there)."""
    folders = cli_folders(tmp_path / "runs")
    keep = os.environ.get("CAI_REPORT_SHOTS")

    async def check(html: Path, png: Path) -> tuple[str, str | None, list[str], int]:
        async with page(chromium) as p:
            await p.open(html.as_uri())
            await p.screenshot(png, height=2400)
            return (await p.js("Array.from(document.querySelector('main').children).filter(e=>e.tagName!=='SCRIPT'"
                               "&&!e.querySelector('#rows')).map(e=>e.innerText).join('\\n')"),  # not the rows' texts
                    await p.js("document.querySelector('.meta').textContent"),
                    p.errors(), await p.js(VISIBLE_ROWS))

    for kind, folder in folders.items():
        _, html = write_report(folder)
        png = tmp_path / f"{kind}.png"
        text, header, errors, rows = asyncio.run(check(html, png))
        assert errors == [] and rows > 0, kind
        assert text_problems(text, header) == [], kind
        assert _png_size(png)[0] == WIDTH
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, Path(keep) / png.name)


def test_cut_text_has_a_cue(chromium: int, tmp_path: Path):
    """A long answer shows its start, an ellipsis and a button that shows it all."""
    run = write_run(tmp_path / "run")
    rows = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()]
    rows[0]["initial_response"] = "word " * 300  # 1,500 characters: shown cut in the cell, whole in the page
    (run / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, html = write_report(run)

    async def check() -> tuple[Any, ...]:
        async with page(chromium) as p:
            await p.open(html.as_uri())
            cell = "document.querySelector('#rows tbody tr').cells[2]"
            before = await p.js(f"{cell}.innerText")
            await p.js(f"{cell}.querySelector('button.more').click()")
            return before, await p.js(f"{cell}.innerText"), p.errors()

    before, after, errors = asyncio.run(check())
    assert errors == [] and "\u2026" in before and "show all 1,499 characters" in before
    assert after.strip() == ("word " * 300).strip() and len(before) < 700
