"""The harness the API fuzzers share (tests/test_api_fuzz.py: the user API over HTTP;
tests/test_peer_fuzz.py: the node-to-node routes over TLS).

Owns: ``Membership`` (a lifecycle stand-in that answers like a member), ``Served`` (the real
ApiServer of tests/test_openapi.py's ``make_server``, request limits off, this node a manager
holding the managers' key, serving on a loopback port from an event loop in a thread of its
own: a subclass says what it serves in ``serve``), ``check_reply`` (the reply rules every
fuzzer asserts, counted per route), ``fuzz_schema`` (schemathesis + hypothesis over one
operation) and ``report``. Must not touch: what each fuzzer boots into the cluster (its
``serve``), its cases, the agent's code.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
from aiohttp import web
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_openapi import make_server

from shoal.node import sealing
from shoal.node.errors import Conflict
from shoal.node.limits import ClientLimits, LimitsConfig
from shoal.node.pki import CertInfo

# replies per route label → status → count (printed by ``report``, recorded in
# docs/reliability.md)
Counts = dict[str, collections.Counter[int]]
# a followed stream never ends by itself: read what comes for this long (s), then go on
STREAM_READ = 0.5


class Membership:
    """This node's lifecycle as the routes see it, answering like a member would."""

    def info(self) -> dict[str, Any]:
        return {"hostname": "h1", "addr": "127.0.0.1", "member": True}

    async def init(self, cluster_cidr: str = "", default_addr_pool: str = ""
                   ) -> dict[str, Any]:
        raise Conflict("this node is already part of a cluster", code="already_member")

    async def join(self, token: str, remote: str) -> dict[str, Any]:
        raise Conflict("this node is already part of a cluster", code="already_member")

    async def leave(self, force: bool) -> dict[str, Any]:
        raise Conflict("leaving is not fuzzed", code="not_fuzzed")

    async def role_changed(self, peer: CertInfo | None, role: Any) -> dict[str, Any]:
        raise Conflict("not fuzzed", code="not_fuzzed")


class Served:
    """The API server on 127.0.0.1:PORT, its event loop in a background thread. ``serve``
    (a subclass's) boots the cluster it needs and returns the started AppRunner."""

    scheme = "http"

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = asyncio.Event()
        self.store: Any = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server, store, ctx = make_server(self.tmp_path)
        self.store = store
        server.c.lifecycle = Membership()
        # no request limits: the fuzzer's thousands of requests must all reach the handlers
        server.limits = {k: ClientLimits(LimitsConfig(max_inflight=0, rate=0))
                         for k in server.limits}
        # a manager with the managers' key, as `shoal init` makes it (node/agent.py)
        assert ctx.identity is not None
        manager_key = sealing.new_key()
        ctx.use(replace(ctx.identity, manager_key=manager_key), store, store)
        runner = await self.serve(server, store, ctx, manager_key)
        self.ready.set()
        await self.stop.wait()
        await runner.cleanup()

    async def serve(self, server: Any, store: Any, ctx: Any, manager_key: bytes
                    ) -> web.AppRunner:
        raise NotImplementedError

    def __enter__(self) -> Served:
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def check_reply(counts: Counts, label: str, resp: requests.Response, where: str, *,
                body_fields: frozenset[str] = frozenset(), absent: bool = False) -> None:
    """Count the reply; it must be below 500 and an error must be the documented
    ``{"error": {"code", "message", "field"}}`` — naming a field for a 400 when the request had
    ``body_fields``. ``absent``: the route's component is not in the harness, a 503
    ``unavailable`` is its documented answer."""
    counts[label][resp.status_code] += 1
    if absent and resp.status_code == 503:
        assert resp.json()["error"]["code"] == "unavailable"
        return
    assert resp.status_code < 500, f"{resp.status_code} {resp.text[:300]} for {where}"
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"not the error shape: {resp.text[:300]} for {where}") from None
        assert set(err) == {"code", "message", "field"}, (err, where)
        assert err["message"], (err, where)
        if resp.status_code == 400 and body_fields:
            assert err["field"], f"a 400 naming no field: {err} for {where}"


def fuzz_schema(op: Any, mode: GenerationMode, url: str, session: requests.Session,
                examples: int, check: Callable[[Any, requests.Response], None]) -> None:
    """``examples`` requests of ``op`` generated in ``mode`` (valid / schema-breaking), sent to
    ``url``; ``check(case, reply)`` each reply (a followed stream that is still streaming after
    STREAM_READ s was accepted: not checked)."""

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            resp = case.call(base_url=url, session=session, timeout=(5, STREAM_READ))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            return  # a followed stream: it was accepted and is streaming
        check(case, resp)

    run()


def report(title: str, counts: Counts, what: str) -> None:
    """Print the number of cases per route (``pytest -s``)."""
    total = sum(sum(c.values()) for c in counts.values())
    print(f"\n{title}: {total} requests over {len(counts)} {what} pairs")
    for label, c in sorted(counts.items()):
        print(f"  {label}: {sum(c.values())} cases, statuses {dict(sorted(c.items()))}")


def new_counts() -> Counts:
    return collections.defaultdict(collections.Counter)
