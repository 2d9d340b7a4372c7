"""Idempotent joins (shoal.node.joining, shoal.node.control.admission): a join whose reply is
lost is retried with the same key and gets the same node — one record, never a Down
leftover beside a second node.

In one process, over real TLS on loopback: the manager is the real ``Admission`` on a
MemoryStore with a real cluster CA, served by an aiohttp TLS listener whose join route can
lose its reply *after* the node was committed (the connection is cut, or the answer comes
after the client's deadline); the client is the real ``Security.call`` with the token's
pinned CA, driven by the agent's retry loop ``request_join``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shoal.node import pki, sealing
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext, VoterChanges
from shoal.node.control.admission import Admission
from shoal.node.errors import ApiError, Forbidden, Unavailable
from shoal.node.joining import Admitted, JoinKey, JoinRetry, join_node_id, request_join
from shoal.node.orchestrator import node_liveness
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.node.tokens import make_token, new_secret
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.schema import SCHEMA

CLUSTER = "c" * 32


@dataclass
class Manager:
    store: MemoryStore
    admission: Admission
    addr: str
    ca_pem: bytes
    token: str
    # what the join route does with the next replies: "cut" (close the connection after
    # the node was admitted), "late" (answer after the client's deadline), "" (answer)
    faults: list[str] = field(default_factory=list)
    admitted: int = 0

    def workers(self) -> list[Node]:
        return [n for n in self.store.snapshot().nodes.values() if n.role is NodeRole.WORKER]


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    ctx = NodeContext(AgentConfig(data_dir=tmp_path / "m1", advertise_addr="127.0.0.1"), "m1")
    mkey = sealing.new_key()
    store = MemoryStore(self_addr="127.0.0.1:2378")
    ctx.use(NodeIdentity(node_id="m1", cluster_id=CLUSTER, role="manager", raft_password="",
                         voters=["127.0.0.1:2378"], manager_key=mkey), store, store)
    sec = Security(ctx)
    ca_pem, ca_key = pki.create_ca(CLUSTER, time.time())
    ca = pki.CertificateAuthority(ca_pem, ca_key)
    worker_secret = new_secret()
    await ctx.propose({"op": "cluster_init", "cluster_id": CLUSTER, "now": 1.0,
                       "worker_secret": sec.seal_token_secret("worker", worker_secret),
                       "manager_secret": sec.seal_token_secret("manager", new_secret()),
                       "digest": ca.digest, "schema": SCHEMA})
    await ctx.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                       "ca_key": sealing.seal(mkey, ca_key, sealing.AAD_CA_KEY)})
    await ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="m1", hostname="m1", addr="127.0.0.1", api_port=2377, raft_port=2378,
        role=NodeRole.MANAGER))})
    admission = Admission(ctx, sec, gossip=None, voters=VoterChanges(5.0))  # type: ignore[arg-type]
    files = pki.TlsFiles(tmp_path / "m1-tls")
    key = pki.new_key()
    files.save(ca_pem, ca.issue(pki.make_csr(key), "m1", pki.ROLE_MANAGER, CLUSTER,
                                time.time(), 3600, "127.0.0.1"), pki.key_pem(key))
    m = Manager(store, admission, "", ca_pem, make_token(ca.digest, worker_secret))

    async def join(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        try:
            reply = await admission.accept_join(body.get("token"), body.get("node"),
                                                body.get("csr"), body.get("schema"))
        except ApiError as exc:
            return web.json_response({"error": {"code": exc.code, "message": exc.message,
                                                "field": exc.field}}, status=exc.status)
        m.admitted += 1
        fault = m.faults.pop(0) if m.faults else ""
        if fault == "cut":  # the node is committed; the answer never reaches the client
            assert req.transport is not None
            req.transport.close()
            raise asyncio.CancelledError
        if fault == "late":
            await asyncio.sleep(3.0)
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/v1/cluster/join", join)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0,
                       ssl_context=pki.server_context(ca_pem, files.cert, False))
    await site.start()
    m.addr = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield m
    finally:
        await runner.cleanup()


@pytest.fixture
async def joiner(tmp_path: Path) -> AsyncIterator[Security]:
    ctx = NodeContext(AgentConfig(data_dir=tmp_path / "w1", advertise_addr="127.0.0.2"), "w1")
    ctx.http = aiohttp.ClientSession()
    try:
        yield Security(ctx)
    finally:
        await ctx.http.close()


async def _join(m: Manager, sec: Security, key: Any, hostname: str = "w1",
                addr: str = "127.0.0.2", retry: JoinRetry | None = None) -> dict[str, Any]:
    """What Agent.join does: the same body on every attempt, real TLS, the retry loop."""
    body = {"token": m.token, "csr": pki.make_csr(key).decode(), "schema": SCHEMA,
            "node": to_dict(Node(id="", hostname=hostname, addr=addr, api_port=2377,
                                 raft_port=2378, role=NodeRole.WORKER))}
    ctx = pki.client_context(m.ca_pem)

    async def call(b: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await sec.call(m.addr, "/v1/cluster/join", b, ctx=ctx, timeout=timeout)

    return await request_join(call, body, retry or JoinRetry(
        deadline=20.0, attempt_timeout=1.0, backoff=0.05, max_backoff=0.2))


@pytest.mark.parametrize("fault", ["cut", "late"])
async def test_a_join_whose_reply_is_lost_is_retried_and_gets_the_same_single_node(
        manager: Manager, joiner: Security, fault: str) -> None:
    """The manager commits the node, then its reply is lost (connection cut / answer after
    the client's deadline); the client retries with the same key: still one worker
    record, the id the reply names, a certificate for that id and key, and the record
    stays READY once that node heartbeats (no never-heard leftover goes DOWN)."""
    key = pki.new_key()
    manager.faults = [fault]
    reply = await _join(manager, joiner, key)
    assert manager.admitted == 2  # the first attempt was admitted, its answer lost
    workers = manager.workers()
    assert [n.id for n in workers] == [reply["node_id"]] and reply["retry"] is True
    info = pki.verify_issued(reply["cert"].encode(), manager.ca_pem, key)
    assert (info.subject_id, info.role) == (reply["node_id"], "worker")
    # the leader's liveness check, long past the down timeout, hearing only from the node
    # that joined (and the manager): nothing goes DOWN
    snap = manager.store.snapshot()
    ops = node_liveness(snap, {"m1": 100.0, reply["node_id"]: 100.0}, 101.0, 5.0)
    assert not [op for op in ops if op.get("state") == NodeState.DOWN.value]
    assert snap.nodes[reply["node_id"]].state is NodeState.READY


async def test_concurrent_attempts_of_one_join_make_one_node_and_other_keys_other_nodes(
        manager: Manager, joiner: Security) -> None:
    """Two attempts of the same join racing (a retry sent while the first is still being
    committed) end in one record; a different key is a different node."""
    key = pki.new_key()
    a, b = await asyncio.gather(_join(manager, joiner, key), _join(manager, joiner, key))
    assert a["node_id"] == b["node_id"]
    other = await _join(manager, joiner, pki.new_key(), hostname="w2", addr="127.0.0.3")
    assert other["node_id"] != a["node_id"]
    assert sorted(n.id for n in manager.workers()) == sorted([a["node_id"], other["node_id"]])


async def test_a_retry_from_a_new_address_updates_the_same_record(
        manager: Manager, joiner: Security) -> None:
    """The key was kept after a failed join and the host's address changed meanwhile: the
    retry is still the same node, its record now with the new address."""
    key = pki.new_key()
    first = await _join(manager, joiner, key)
    again = await _join(manager, joiner, key, addr="127.0.0.9")
    assert again["node_id"] == first["node_id"] and again["retry"] is True
    assert [(n.id, n.addr) for n in manager.workers()] == [(first["node_id"], "127.0.0.9")]


async def test_a_refusal_is_not_retried(manager: Manager, joiner: Security) -> None:
    manager.token = manager.token[:-4] + "0000"
    with pytest.raises(Forbidden):
        await _join(manager, joiner, pki.new_key())
    assert manager.admitted == 0 and manager.workers() == []


async def test_retry_gives_up_at_its_deadline_with_the_last_error() -> None:
    calls: list[float] = []

    async def call(_b: dict[str, Any], timeout: float) -> dict[str, Any]:
        calls.append(timeout)
        raise Unavailable("cannot reach 10.0.0.1:2377")

    async def no_sleep(_s: float) -> None:
        await asyncio.sleep(0)

    with pytest.raises(Unavailable):
        await request_join(call, {}, JoinRetry(deadline=0.05, attempt_timeout=5.0,
                                               backoff=0.01), sleep=no_sleep)
    assert len(calls) >= 2 and all(t >= 1.0 for t in calls)


def test_the_join_key_survives_until_the_join_succeeds(tmp_path: Path) -> None:
    """The key is written before the first attempt and reused by a later `shoal join`
    (same node id), and forgotten once joined (a later join is a new node)."""
    jk = JoinKey(tmp_path)
    first = jk.load_or_create()
    assert (jk.path.stat().st_mode & 0o777) == 0o600
    again = jk.load_or_create()
    csr1, csr2 = pki.make_csr(first).decode(), pki.make_csr(again).decode()
    assert join_node_id(CLUSTER, csr1) == join_node_id(CLUSTER, csr2)
    assert join_node_id("d" * 32, csr1) != join_node_id(CLUSTER, csr1)
    jk.forget()
    assert not jk.path.exists()
    assert join_node_id(CLUSTER, pki.make_csr(jk.load_or_create()).decode()) != \
        join_node_id(CLUSTER, csr1)
    jk.path.write_bytes(b"torn")
    assert jk.load_or_create() is not None  # a torn file is replaced, not fatal


def test_an_admitted_join_is_remembered_until_node_json_is_written(tmp_path: Path) -> None:
    """What a restarted agent resumes from (shoal.node.joining.Admitted): the admitting
    manager, node id, role and cluster; gone once removed; an unreadable file is ignored."""
    assert Admitted.load(tmp_path) is None
    adm = Admitted("10.0.0.1:2377", "n" * 20, "worker", CLUSTER)
    adm.save(tmp_path)
    assert (Admitted.path(tmp_path).stat().st_mode & 0o777) == 0o600
    assert Admitted.load(tmp_path) == adm
    Admitted.remove(tmp_path)
    assert Admitted.load(tmp_path) is None
    Admitted.path(tmp_path).write_text("{torn")
    assert Admitted.load(tmp_path) is None
