"""Fuzzing the user API from its own OpenAPI description (schemathesis + hypothesis).

The agent's real ApiServer (node/api.py: routes, middlewares, the command modules on the
in-memory store, as tests/test_openapi.py wires it) listens on a loopback port in a thread
of its own; schemathesis generates requests from ``GET /v1/openapi.json``'s description,
both valid ones (positive) and ones that break the schema (negative: wrong types, missing
fields, bad path parameters), and sends them over HTTP. Every reply must be a non-5xx
status, an error reply must be the documented ``{"error": {"code", "message", "field"}}``,
and a 400 about a request body must name the field. The server must still answer after the
run. The lifecycle (init/join/leave) is a stand-in here that accepts and answers: it is
tested for real in the cluster tests; what is fuzzed is the API's handling of the input.

The number of cases per route is printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_openapi import make_server

from shoal.node import openapi, pki, sealing
from shoal.node.errors import Conflict
from shoal.node.limits import ClientLimits, LimitsConfig
from shoal.node.pki import CertInfo
from shoal.raft.schema import SCHEMA as SCHEMA_VERSION

EXAMPLES = 40  # per route and mode: ~55 routes x 2 modes x 40 = 4,400 requests
# follow=true streams never end by themselves: read what comes for this long, then go on
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
    """The API server on 127.0.0.1:PORT, its event loop in a background thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.tmp_path = tmp_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = asyncio.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server, store, ctx = make_server(self.tmp_path)
        server.c.lifecycle = Membership()
        # no request limits: the fuzzer's thousands of requests must all reach the handlers
        server.limits = {k: ClientLimits(LimitsConfig(max_inflight=0, rate=0))
                         for k in server.limits}
        # a manager with the cluster's keys and CA, as `shoal init` makes it (node/agent.py)
        assert ctx.identity is not None
        manager_key = sealing.new_key()
        ctx.use(replace(ctx.identity, manager_key=manager_key), store, store)
        ca_pem, ca_key = pki.create_ca("c1", time.time())
        sec = server.c.security
        await store.propose({"op": "cluster_init", "cluster_id": "c1", "now": time.time(),
                             "worker_secret": sec.seal_token_secret("worker", "w" * 32),
                             "manager_secret": sec.seal_token_secret("manager", "m" * 32),
                             "digest": pki.CertificateAuthority(ca_pem, ca_key).digest,
                             "schema": SCHEMA_VERSION})
        await store.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                             "ca_key": sealing.seal(manager_key, ca_key, sealing.AAD_CA_KEY)})
        runner = web.AppRunner(server.local_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.ready.set()
        await self.stop.wait()
        await runner.cleanup()

    def __enter__(self) -> Served:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(tmp_path_factory.mktemp("fuzz")) as s:
        yield s
    total = sum(sum(c.values()) for c in COUNTS.values())
    print(f"\nAPI fuzz: {total} requests over {len(COUNTS)} route/mode pairs")
    for label, counts in sorted(COUNTS.items()):
        print(f"  {label}: {sum(counts.values())} cases, statuses {dict(sorted(counts.items()))}")


SCHEMA = schemathesis.openapi.from_dict(openapi.openapi())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]
USER_OPS = [op for op in OPERATIONS if "internal" not in op.tags]


def _breakable(op: Any) -> bool:
    """Whether a request of ``op`` can break its schema: it has a body, a query, or a path
    parameter with a constraint (any string is a valid unconstrained path parameter)."""
    constrained = any(set(p.definition.get("schema", {})) & {"enum", "pattern", "maxLength"}
                      for p in op.path_parameters)
    return bool(list(op.body)) or bool(list(op.query)) or constrained


MALFORMED_OPS = [op for op in USER_OPS if _breakable(op)]
# Routes whose component is absent from this harness and says so with a 503 (documented
# status "unavailable"): gossip key rotation needs a running memberlist (tested for real in
# tests/test_gossip_keys.py).
ABSENT = {"POST /v1/gossip/rotate-key"}
COUNTS: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def _check(op_label: str, case: Any, resp: requests.Response) -> None:
    COUNTS[op_label][resp.status_code] += 1
    where = f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r}"
    if resp.status_code == 503 and case.operation.label in ABSENT:
        assert resp.json()["error"]["code"] == "unavailable"
        return
    assert resp.status_code < 500, f"{resp.status_code} {resp.text[:300]} for {where}"
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"code", "message", "field"}, (err, where)
        assert err["message"], (err, where)


@pytest.mark.parametrize(("op", "mode"), [
    *[pytest.param(op, GenerationMode.POSITIVE, id=f"valid {op.label}") for op in USER_OPS],
    *[pytest.param(op, GenerationMode.NEGATIVE, id=f"malformed {op.label}")
      for op in MALFORMED_OPS]])
def test_no_request_gets_a_server_error(served: Served, op: Any, mode: GenerationMode) -> None:
    """Valid and malformed requests of every user route: never a 5xx, errors in the
    documented shape."""
    session = requests.Session()
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            resp = case.call(base_url=served.url, session=session, timeout=(5, STREAM_READ))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            return  # a followed stream: it was accepted and is streaming
        _check(f"{op.label} {mode.value}", case, resp)

    run()
    assert requests.get(f"{served.url}/v1/info", timeout=5).status_code == 200
