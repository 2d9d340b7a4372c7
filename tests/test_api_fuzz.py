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

import time
from collections.abc import Iterator
from typing import Any

import fuzzharness
import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis import GenerationMode

from shoal.node import openapi, pki, sealing
from shoal.node.api import STOP_GRACE
from shoal.raft.schema import SCHEMA as SCHEMA_VERSION

EXAMPLES = 40  # per route and mode: ~55 routes x 2 modes x 40 = 4,400 requests


class Served(fuzzharness.Served):
    """The user API on http://127.0.0.1:PORT of a one-manager cluster with its CA."""

    async def serve(self, server: Any, store: Any, ctx: Any, manager_key: bytes
                    ) -> web.AppRunner:
        ca_pem, ca_key = pki.create_ca("c1", time.time())
        sec = server.c.security
        await store.propose({"op": "cluster_init", "cluster_id": "c1", "now": time.time(),
                             "worker_secret": sec.seal_token_secret("worker", "w" * 32),
                             "manager_secret": sec.seal_token_secret("manager", "m" * 32),
                             "digest": pki.CertificateAuthority(ca_pem, ca_key).digest,
                             "schema": SCHEMA_VERSION})
        await store.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                             "ca_key": sealing.seal(manager_key, ca_key, sealing.AAD_CA_KEY)})
        runner = web.AppRunner(server.local_app(), shutdown_timeout=STOP_GRACE)  # as the agent
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(tmp_path_factory.mktemp("fuzz")) as s:
        yield s
    fuzzharness.report("API fuzz", COUNTS, "route/mode")


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
COUNTS = fuzzharness.new_counts()


@pytest.mark.parametrize(("op", "mode"), [
    *[pytest.param(op, GenerationMode.POSITIVE, id=f"valid {op.label}") for op in USER_OPS],
    *[pytest.param(op, GenerationMode.NEGATIVE, id=f"malformed {op.label}")
      for op in MALFORMED_OPS]])
def test_no_request_gets_a_server_error(served: Served, op: Any, mode: GenerationMode) -> None:
    """Valid and malformed requests of every user route: never a 5xx, errors in the
    documented shape."""
    label = f"{op.label} {mode.value}"

    def check(case: Any, resp: requests.Response) -> None:
        where = f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r}"
        fuzzharness.check_reply(COUNTS, label, resp, where,
                                absent=case.operation.label in ABSENT)

    fuzzharness.fuzz_schema(op, mode, served.url, requests.Session(), EXAMPLES, check)
    assert requests.get(f"{served.url}/v1/info", timeout=5).status_code == 200


@pytest.mark.parametrize(("path", "body", "field"), [
    # what the fuzzer once found: a label's value that is no string, holding an integer
    # msgpack cannot encode (a 500 from the Raft proposal, before the check below)
    ("/v1/secrets", {"name": "s1", "data": "eA==", "labels": {"k": [-(2**63) - 1]}}, "labels.k[0]"),
    ("/v1/secrets", {"name": "s1", "data": "eA==", "labels": {"k": 1}}, "labels"),
    ("/v1/configs", {"name": "c1", "data": "eA==", "labels": {"k": ["v"]}}, "labels"),
    ("/v1/configs", {"name": "c1", "data": "eA==", "labels": {"k": 2**64}}, "labels.k"),
    ("/v1/services", {"name": "web", "image": "host", "command": ["sleep", "1"],
                      "mode": {"replicated": {"replicas": 2**70}}}, "mode.replicated.replicas"),
])
def test_out_of_range_numbers_and_non_string_labels_are_refused_by_field(
        served: Served, path: str, body: dict[str, Any], field: str) -> None:
    """Integers beyond 64 bits anywhere in a body, and labels that are not strings, get a 400
    naming the field; nothing is created."""
    resp = requests.post(f"{served.url}{path}", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == field, resp.json()
    names = [o["name"] for o in requests.get(f"{served.url}{path}", timeout=10).json()]
    assert body["name"] not in names
