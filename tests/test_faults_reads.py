"""Linearizable reads over real pysyncobj: a deposed leader never serves a stale read.

Three RaftStores on loopback; the partition is the transport's fault hook (every Raft
message to or from a cut-off peer is dropped, ``AdmissionTransport(link_up=...)``), so the
test decides exactly when the old leader is cut off. Its ``leader_fallback_timeout`` is
longer than the test: the cut-off leader still believes it leads throughout — the case
Jepsen found in etcd and Consul — and must still refuse a read it cannot confirm.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, until

from shoal.raft.errors import NotReady
from shoal.raft.store import RaftConfig, RaftStore

# the deposed leader keeps believing it leads for the whole test (steps down only after 60 s)
CFG = RaftConfig(leader_fallback_timeout=60.0, write_timeout=5.0)


def _create(sid: str) -> dict[str, Any]:
    return {"op": "service_create", "id": sid, "now": 1.0,
            "spec": {"name": sid, "command": ["true"]}}


async def test_a_deposed_leader_cut_off_by_a_partition_serves_no_stale_read(
        tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    cut: set[str] = set()  # the minority side of the partition

    def link(me: str) -> Callable[[str], bool]:
        return lambda peer: (me in cut) == (peer in cut)

    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", config=CFG, persist=False,
                        link_up=link(a)) for i, a in enumerate(addrs)]
    try:
        old = await until(lambda: next((s for s in stores if s.is_leader() and all(
            x.is_ready() for x in stores)), None), 60.0, "a leader, every replica ready")
        await old.propose(_create("before"))
        for s in stores:  # leader and followers: each confirms and then sees the write
            await s.read_barrier()
            assert "before" in s.snapshot().services

        cut.add(str(old.self_addr))
        majority = [s for s in stores if s is not old]
        new = await until(lambda: next((s for s in majority if s.is_leader()), None), 30.0,
                          "a new leader on the majority side")
        await new.propose(_create("after"))
        assert old._sync._isLeader(), "the cut-off leader should still believe it leads"

        # by default: no answer rather than a stale one
        with pytest.raises(NotReady, match="could not confirm"):
            await old.read_barrier(timeout=2.0)
        # --stale: its own copy, which lacks the write the majority acknowledged
        assert "after" not in old.snapshot().services
        for s in majority:  # the majority's follower forwards its barrier to the new leader
            await s.read_barrier()
            assert "after" in s.snapshot().services

        cut.clear()  # heal: the old leader learns the new term and catches up
        await until(lambda: not old._sync._isLeader(), 30.0, "the old leader steps down")
        await old.read_barrier(timeout=15.0)
        assert "after" in old.snapshot().services
    finally:
        for s in stores:
            s.close()


async def test_reads_waiting_together_share_one_barrier(tmp_path: Path) -> None:
    """Concurrent reads cost one log entry, not one each (a read never joins a barrier
    sent before it began: the next batch gets a new one)."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(addr, [addr], tmp_path / "n", "secret", config=CFG, persist=False)
    try:
        await until(lambda: store.is_leader() and store.is_ready(), 30.0, "a ready leader")
        before = store.index
        await asyncio.gather(*(store.read_barrier() for _ in range(20)))
        assert store.index == before + 1
        await store.read_barrier()
        assert store.index == before + 2
    finally:
        store.close()


def test_the_cli_stale_flag_asks_for_a_local_read(tmp_path: Path) -> None:
    """`shoal --stale ...` adds ?stale=1 to its reads (GET) and to nothing else."""
    import http.server
    import json
    import socketserver
    import threading

    from shoal.cli.main import Client, build_parser

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps([]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

        def log_message(self, *_: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        def get_request(self) -> Any:  # (BaseHTTPRequestHandler wants an address pair)
            conn, _ = super().get_request()
            return conn, ("local", 0)

    sock = tmp_path / "s.sock"
    with Server(str(sock), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            args = build_parser().parse_args(["--stale", "service", "ls"])
            assert args.stale
            c = Client(f"unix://{sock}")
            c.stale = args.stale
            c.call("GET", "/v1/services")
            c.call("GET", "/v1/services/web/logs?tail=5")
            c.call("POST", "/v1/services/web/scale", {"replicas": 1})
            assert not build_parser().parse_args(["service", "ls"]).stale
        finally:
            server.shutdown()
    assert seen == ["GET /v1/services?stale=1", "GET /v1/services/web/logs?tail=5&stale=1",
                    "POST /v1/services/web/scale"]
