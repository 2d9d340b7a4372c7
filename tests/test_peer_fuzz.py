"""Fuzzing the node-to-node routes (``/v1/cluster/*``) with a valid client certificate.

The agent's real ApiServer (node/api.py's ``peer_app``: the route table, the middlewares,
the command modules on the in-memory store, wired as tests/test_openapi.py wires it) listens
over TLS on a loopback port, with the cluster's certificates (a CA made by ``pki.create_ca``,
the server's and the caller's node certificates issued by it, as ``shoal init``/``join`` make
them). The caller presents the certificate of a current member — a manager, so that every
route's handler is reached past its certificate check — and sends hostile input:

* schemathesis, from the peer routes' own OpenAPI description (tag ``internal``): valid
  bodies and ones that break the schema (wrong types, missing fields, extra fields);
* hand-made cases for every route: msgpack garbage, truncated JSON, a JSON array / string /
  null instead of an object, wrong content types, each body field replaced by a value of
  every wrong type, huge and negative numbers, NaN/Infinity, and hostile query strings.

Every reply must be below 500, an error must be the documented ``{"error": {"code",
"message", "field"}}`` (a 400 about a body field names the field), the agent must still
answer afterwards, and the replicated state must be what it was before (every rejected
command leaves it alone; the Raft index may move: a refused command still takes a slot).

The number of cases per route is printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzzharness
import msgpack
import pytest
import requests
import schemathesis
from aiohttp import web
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from test_events_api import boot

from shoal.node import openapi, pki, sealing
from shoal.node.api import STOP_GRACE
from shoal.raft.models import to_dict
from shoal.raft.schema import SCHEMA as SCHEMA_VERSION

EXAMPLES = 20  # per route and mode (+ ~600 hand-made cases): ~1,100 requests


class Served(fuzzharness.Served):
    """The peer API on https://127.0.0.1:PORT (TLS, the cluster's certificates);
    ``state()`` is the replicated state without its index."""

    scheme = "https"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.client_pem = tmp_path / "client.pem"
        self.ca_pem = b""

    async def serve(self, server: Any, store: Any, ctx: Any, manager_key: bytes
                    ) -> web.AppRunner:
        now = time.time()
        ca_pem, ca_key = pki.create_ca("c1", now)
        ca = pki.CertificateAuthority(ca_pem, ca_key)
        sec = server.c.security
        await boot(ctx)  # cluster c1 with manager n1 (the node the certificates name)
        await store.propose({"op": "cluster_schema", "schema": SCHEMA_VERSION})
        await store.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                             "ca_key": sealing.seal(manager_key, ca_key, sealing.AAD_CA_KEY)})
        for role in ("worker", "manager"):
            await store.propose({"op": "rotate_secret", "role": role,
                                 "secret": sec.seal_token_secret(role, role[0] * 32)})
        for path, subject in ((None, "n1"), (self.client_pem, "n1")):
            key = pki.new_key()
            cert = ca.issue(pki.make_csr(key), subject, pki.ROLE_MANAGER, "c1", now, 3600,
                            "127.0.0.1")
            if path is None:
                sec.files.dir.mkdir(parents=True, exist_ok=True)
                sec.files.save(ca_pem, cert, pki.key_pem(key))
                sec.load()
            else:
                path.write_bytes(cert + pki.key_pem(key))
        self.ca_pem = ca_pem
        runner = web.AppRunner(server.peer_app(), shutdown_timeout=STOP_GRACE)  # as the agent
        await runner.setup()
        from shoal.node.api import tls_listener
        await web.TCPSite(runner, "127.0.0.1", self.port,
                          ssl_context=tls_listener(lambda: sec.server_ctx, False)).start()
        return runner

    def state(self) -> Any:
        """The replicated state as plain values, without the index (read on the loop)."""
        async def read() -> Any:
            out = to_dict(self.store.snapshot())
            out.pop("index", None)
            return out
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(10)

    def session(self) -> requests.Session:
        """A requests session presenting the member's certificate (the server's name is
        ``manager.shoal``, not 127.0.0.1: the CA is checked, the host name is not)."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        ctx.check_hostname = False
        ctx.load_cert_chain(str(self.client_pem))

        class Adapter(HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kw: Any) -> None:
                kw["ssl_context"] = ctx
                kw["assert_hostname"] = False
                super().init_poolmanager(*args, **kw)

        s = requests.Session()
        s.mount("https://", Adapter())
        return s


COUNTS = fuzzharness.new_counts()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(tmp_path_factory.mktemp("peerfuzz")) as s:
        before = s.state()
        yield s
        assert s.state() == before, "the peer routes changed the replicated state"
    fuzzharness.report("peer API fuzz", COUNTS, "route/kind")


SCHEMA = schemathesis.openapi.from_dict(openapi.openapi())
PEER_OPS = [r.ok() for r in SCHEMA.get_all_operations() if "internal" in r.ok().tags]
PEER_ROUTES = openapi.routes("peer")


def _check(label: str, resp: requests.Response, where: str,
           body_fields: frozenset[str] = frozenset()) -> None:
    fuzzharness.check_reply(COUNTS, label, resp, where, body_fields=body_fields)


def _call(s: requests.Session, method: str, url: str, **kw: Any) -> requests.Response | None:
    try:
        return s.request(method, url, timeout=(5, fuzzharness.STREAM_READ), **kw)
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
        return None  # a followed stream: accepted and streaming


@pytest.mark.parametrize(("op", "mode"), [
    *[pytest.param(op, GenerationMode.POSITIVE, id=f"valid {op.label}") for op in PEER_OPS],
    *[pytest.param(op, GenerationMode.NEGATIVE, id=f"malformed {op.label}")
      for op in PEER_OPS if list(op.body)]])
def test_schema_driven_requests_get_no_server_error(served: Served, op: Any,
                                                    mode: GenerationMode) -> None:
    """Valid and malformed requests of every peer route, from its description: never a
    5xx, errors in the documented shape."""
    label = f"{op.label} {mode.value}"

    def check(case: Any, resp: requests.Response) -> None:
        _check(label, resp, f"{case.method} {case.formatted_path} body={case.body!r}")

    fuzzharness.fuzz_schema(op, mode, served.url, served.session(), EXAMPLES, check)


WRONG_VALUES: list[Any] = [None, True, -1, 0, 10**30, -10**30, 1e308, "x" * 5000, "",
                           [], [1, "a"], {}, {"op": "node_remove", "node_id": "n1"}]
RAW_BODIES: list[tuple[bytes, str]] = [
    (msgpack.packb({"after": 1, "cmd": {"op": "x"}}), "application/msgpack"),
    (b"\xc1\xff\x00\x93garbage", "application/msgpack"),
    (b'{"after": 1, "node_id": "n', "application/json"),  # truncated
    (b"[1, 2, 3]", "application/json"),
    (b'"a string"', "application/json"),
    (b"null", "application/json"),
    (b'{"after": NaN, "wait": Infinity, "task_ids": -Infinity}', "application/json"),
    (b'{"after": 1e999999}', "application/json"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "application/json"),  # deep nesting
    (b"\xff\xfe{\x00}\x00", "application/json"),  # not UTF-8
    (b'{"node_id": "n1"}', "text/plain"),
    (b"node_id=n1&after=1", "application/x-www-form-urlencoded"),
    (b"", "application/json"),
]
QUERIES = ["?after=-1&wait=1e309", "?stale=%00", "?" + "x=1&" * 500, "?digest=..%2F..%2F"]


def _path(route: openapi.Route) -> str:
    return route.path.replace("{digest}", "sha256:" + "0" * 64)


def _fields(route: openapi.Route) -> list[str]:
    body = route.body
    return list(getattr(body, "__struct_fields__", ())) if body is not None else []


@pytest.mark.parametrize("route", [pytest.param(r, id=f"{r.method} {r.path}")
                                   for r in PEER_ROUTES])
def test_hostile_bodies_and_queries_get_no_server_error(served: Served,
                                                        route: openapi.Route) -> None:
    """Every peer route: garbage, truncated and wrongly typed bodies, wrong content types,
    every body field given a value of each wrong type (huge numbers included), hostile
    query strings → a 4xx in the documented shape (naming the field), never a 5xx."""
    s = served.session()
    label = f"{route.method} {route.path} hostile"
    url = served.url + _path(route)
    for q in QUERIES:
        resp = _call(s, route.method, url + q)
        if resp is not None:
            _check(label, resp, f"query {q[:60]}")
    if route.method == "GET":
        return
    for raw, ctype in RAW_BODIES:
        resp = _call(s, "POST", url, data=raw, headers={"Content-Type": ctype})
        if resp is not None:
            _check(label, resp, f"{ctype} {raw[:60]!r}")
    fields = _fields(route)
    for name in fields:
        for value in WRONG_VALUES:
            resp = _call(s, "POST", url, data=json.dumps({name: value}),
                         headers={"Content-Type": "application/json"})
            if resp is not None:
                _check(label, resp, f"{{{name}: {str(value)[:40]}}}", frozenset(fields))


def test_the_agent_still_answers_and_a_blob_path_cannot_escape(served: Served) -> None:
    """After the fuzzing: the CA route answers; a blob digest with path tricks is a 4xx."""
    s = served.session()
    assert s.get(served.url + "/v1/cluster/ca", timeout=5).status_code == 200
    for digest in ("..%2F..%2Fetc%2Fpasswd", "sha256:..", "sha256:" + "g" * 64, "%00"):
        resp = s.get(f"{served.url}/v1/cluster/images/blobs/{digest}", timeout=5)
        _check("GET /v1/cluster/images/blobs/{digest} hostile", resp, digest)
        assert resp.status_code in (400, 404), resp.text


def test_a_deeply_nested_body_is_a_400_naming_body(served: Served) -> None:
    """Regression: 5,000 nested JSON objects overflowed json's decoder (RecursionError → 500
    on every route with a body, the user API's too: one ``_body`` reads them all)."""
    raw = b'{"a": ' * 5000 + b"1" + b"}" * 5000
    resp = served.session().post(served.url + "/v1/cluster/heartbeat", data=raw,
                                  headers={"Content-Type": "application/json"}, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "body"
