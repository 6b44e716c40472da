"""The review page's local server (aiohttp): the page, the pairs, and one append per answer.

Routes: ``GET /`` the page (self-contained: its CSS and script inline, nothing fetched from the
network); ``GET /api/state?reviewer=NAME`` the pairs in review order with NAME's labels and
counter; ``POST /api/label`` ``{"id", "label", "shown_left", "reviewer"}`` appends one record to
human_labels.jsonl (fsynced before the reply); ``POST /api/undo`` ``{"reviewer"}`` appends an undo
of NAME's latest label still in effect. Every reply of a POST carries NAME's labels, so two tabs
stay in step. POSTs must be JSON (``Content-Type: application/json``), which a page of another
site cannot send here without the CORS preflight this server never answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import webbrowser
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ..analysis import human
from . import labels as lab


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "separators": (",", ":")}
    return env.from_string(files(__package__).joinpath("page.html.j2").read_text(encoding="utf-8"))


def _principle_texts(run_dir: Path) -> dict[str, str]:
    try:
        manifest = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return {str(p["id"]): str(p.get("comparison") or "") for p in manifest["constitution"]["principles"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Review:
    """A run folder under review: its pairs in order, and what one reviewer has labelled."""

    def __init__(self, run_dir: Path, *, reviewer: str, sample: int | None = None, seed: int = 0,
                 show_principles: bool = False) -> None:
        self.run_dir, self.reviewer, self.show_principles = Path(run_dir), reviewer, show_principles
        self.pairs = lab.review_order(human.load_pairs(self.run_dir), sample, seed)
        self.ids = {p["id"] for p in self.pairs}
        self.sample = "uniform" if sample is not None else "uncertainty"
        self.order_text = (f"A uniform random sample of {len(self.pairs)} pairs (seed {seed}), in random "
                           "order: their agreement figure is an unbiased estimate." if sample is not None
                           else lab.ORDER_TEXT)
        self.texts = _principle_texts(self.run_dir)

    def _pair(self, p: dict[str, Any], reviewer: str) -> dict[str, Any]:
        per = {(j.get("principle_id"), j.get("order")): j.get("p_a") for j in p.get("judgements") or []
               if not j.get("abstain")}
        return {"id": p["id"], "prompt": p.get("prompt") or [], "a": p.get("response_a", ""),
                "b": p.get("response_b", ""), "left": lab.shown_left(p["id"], reviewer),
                "judge": {"label": p.get("label"), "p_a": p.get("p_a"),
                          "orders_agree": p.get("position_consistent"),
                          "principles": [{"id": pid, "text": self.texts.get(pid, ""), "p_a": v,
                                          "ab": per.get((pid, "ab")), "ba": per.get((pid, "ba"))}
                                         for pid, v in human.principle_sides(p).items()]},
                "principles": [{"id": pid, "text": self.texts.get(pid, "")} for pid in p.get("principle_ids") or []]}

    def labels(self, reviewer: str) -> dict[str, Any]:
        """NAME's labels in effect and the counter: labelled, agreement so far (NAME's and everyone's)."""
        records = [r for r in human.read_records(self.run_dir) if r["id"] in self.ids]
        mine = [r for r in records if r["reviewer"] == reviewer]
        own = {pid: r["label"] for (pid, _), r in human.current(mine).items()}
        return {"labels": own, "agreement": human.summarize(self.pairs, mine)["agreement"],
                "everyone": {k: v for k, v in human.summarize(self.pairs, records).items()
                             if k in ("reviewed", "reviewers", "agreement")}}

    def state(self, reviewer: str) -> dict[str, Any]:
        return {"pairs": [self._pair(p, reviewer) for p in self.pairs], **self.labels(reviewer)}

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        rec = lab.record(str(body.get("id")), body.get("label"), body.get("shown_left"), str(body.get("reviewer")),
                     self.sample)
        if problem := human.check(rec, self.ids):
            raise web.HTTPBadRequest(text=problem)
        lab.append(self.run_dir, [rec])
        return self.labels(rec["reviewer"])

    def undo(self, reviewer: str) -> dict[str, Any]:
        """Retract REVIEWER's latest label still in effect (an appended record with label null)."""
        records = human.read_records(self.run_dir)
        live = {id(r) for r in human.current(records).values()}
        last = next((r for r in reversed(records)
                     if id(r) in live and r["reviewer"] == reviewer and r["id"] in self.ids), None)
        if last is not None:
            lab.append(self.run_dir, [lab.record(last["id"], None, last.get("shown_left"), reviewer, self.sample)])
        return {"undone": None if last is None else last["id"], **self.labels(reviewer)}


def _reviewer(value: Any, default: str) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else default


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="not valid JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="send a JSON object")
    return body


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def make_app(review: Review, host: str = "127.0.0.1") -> web.Application:
    """The app; bound to a loopback address it answers only requests addressed to one (another
    name resolving here, as in DNS rebinding, gets 403)."""

    @web.middleware
    async def local_only(request: web.Request, handler: Any) -> web.StreamResponse:
        if host in LOOPBACK and request.url.host not in LOOPBACK:
            raise web.HTTPForbidden(text=f"this page answers on {host} only")
        result: web.StreamResponse = await handler(request)
        return result

    async def page(request: web.Request) -> web.Response:
        html = _template().render(run=str(review.run_dir), order_text=review.order_text,
                                  config={"reviewer": review.reviewer, "show_principles": review.show_principles})
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def state(request: web.Request) -> web.Response:
        return web.json_response(review.state(_reviewer(request.query.get("reviewer"), review.reviewer)))

    async def label(request: web.Request) -> web.Response:
        body = await _json(request)
        body["reviewer"] = _reviewer(body.get("reviewer"), review.reviewer)
        return web.json_response(review.answer(body))

    async def undo(request: web.Request) -> web.Response:
        body = await _json(request)
        return web.json_response(review.undo(_reviewer(body.get("reviewer"), review.reviewer)))

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application(middlewares=[local_only])
    app.add_routes([web.get("/", page), web.get("/api/state", state), web.post("/api/label", label),
                    web.post("/api/undo", undo), web.get("/favicon.ico", no_icon)])
    return app


async def serve(review: Review, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True,
                ready: Callable[[str], None] = print) -> None:
    """Serve until cancelled; ``ready`` gets the page's address once it listens."""
    runner = web.AppRunner(make_app(review, host), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}/"
        ready(url)
        if open_browser:
            webbrowser.open(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
