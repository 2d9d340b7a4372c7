"""Persisted state migrates: a Raft data dir written by shoal 0.1 (schema 1, flat ServiceSpec)
loads into today's nested model, and a cluster still at schema 1 writes only what 0.1 can read.

The fixture tests/fixtures/raft-v1/ was written by 0.1's own code (tests/fixtures/make_raft_v1.py
at commit e37643f): a pickled dump (snapshot) plus journal entries after it.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from shoal.raft import schema
from shoal.raft.errors import CommandRejected, ValidationError
from shoal.raft.models import TaskState
from shoal.raft.state import ClusterState
from shoal.raft.store import RaftConfig, RaftStore
from shoal.raft.wire import state_from_bytes, state_to_bytes

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "raft-v1"
# the voter address the fixture was written with: the dump stores the Raft topology, which
# overrides the constructor's member list, so the store must come back on the same address
FIXTURE_ADDR = "127.0.0.1:50449"
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]  # pysyncobj's meta file
FAST = RaftConfig(raft_min_timeout=0.3, raft_max_timeout=0.5, append_entries_period=0.05)
NESTED = {"name": "api9", "task": {"container": {"command": ["sleep", "1"]}}}


def _addr() -> str:
    with socket.socket() as s:  # fails clearly if something else holds the port
        s.bind(("127.0.0.1", int(FIXTURE_ADDR.rsplit(":", 1)[1])))
    return FIXTURE_ADDR


async def _open(data: Path, addr: str) -> RaftStore:
    store = RaftStore(addr, [addr], data, None, config=FAST)
    deadline = time.monotonic() + 10
    while not store.is_leader():
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.02)
    # an entry of this term makes the replica ready (a harmless no-op command)
    await store.propose({"op": "cluster_schema", "schema": 1}, timeout=5)
    assert store.is_ready()
    return store


@pytest.fixture
def v1_dir(tmp_path: Path) -> Path:
    data = tmp_path / "raft"
    shutil.copytree(FIXTURE, data)
    return data


async def test_a_schema1_data_dir_loads_into_the_nested_model(v1_dir: Path) -> None:
    """Dump and journal of 0.1 replay into today's records; nothing is lost."""
    store = await _open(v1_dir, _addr())
    try:
        snap = store.snapshot()
        assert (v1_dir / "raft.dump.schema1").exists()  # the original is kept
        assert snap.cluster.cluster_id == "c0ffee" and snap.cluster.schema == 1
        by_name = {s.spec.name: s for s in snap.services.values()}
        assert set(by_name) == {"web", "api", "batch"}
        web = by_name["web"].spec
        c = web.task.container
        assert c.command == ("python3", "-m", "http.server", "8000")
        assert c.env == {"MODE": "prod"} and c.workdir == "/srv" and c.user == "1000:1000"
        assert c.stop_signal == "SIGINT" and c.stop_grace_period == 5.0
        assert [m.target for m in c.mounts] == ["/tmp", "/data"]
        assert c.secrets[0].name == "db-pass" and c.secrets[0].mode == 0o400
        assert web.task.resources.limits.memory == 64 << 20
        assert web.task.resources.reservations.cpu == 0.1
        assert web.task.restart.condition == "on-failure" and web.task.restart.max_attempts == 3
        assert web.task.placement.constraints == ("node.role==worker",)
        assert web.mode.replicas == 3 and web.update.parallelism == 2
        assert web.update.delay == 1.5
        assert web.endpoint.lb_algorithm == "least-conn"
        assert web.endpoint.ports[0].published == 8080
        assert web.labels == {"tier": "front"}
        # the journal after the dump: scale of api, update + rollback of web
        assert by_name["api"].spec.mode.replicas == 4
        assert by_name["web"].version == 3
        prev = by_name["web"].previous_spec
        assert prev is not None and prev.task.container.env == {"MODE": "canary"}
        assert by_name["batch"].spec.task.container.image == "busybox"
        # tasks carry their template, upgraded from the flat spec 0.1 stored in them
        web_tasks = [t for t in snap.tasks.values() if t.service_name == "web"]
        assert web_tasks and all(t.spec.container.command == c.command for t in web_tasks)
        running = [t for t in snap.tasks.values() if t.status.state is TaskState.RUNNING]
        assert running and all(t.status.pid == 4242 for t in running)
        index = snap.index
    finally:
        store.close()
    # restart: the migrated dump (and, after a compaction, today's format) loads again
    store = await _open(v1_dir, _addr())
    try:
        assert store.snapshot().index == index + 1
        store._sync.forceLogCompaction()
        await asyncio.sleep(1.0)
        with gzip.open(v1_dir / "raft.dump", "rb") as f:
            assert b"state_v2" in f.read()
    finally:
        store.close()
    store = await _open(v1_dir, _addr())
    try:
        assert {s.spec.name for s in store.snapshot().services.values()} == {
            "web", "api", "batch"}
    finally:
        store.close()


async def test_a_schema1_cluster_is_written_in_schema1(v1_dir: Path) -> None:
    """While the cluster is at schema 1, commands go into the log as 0.1 reads them; a field
    0.1 cannot express is refused, naming it; after ``cluster_schema`` 2, nested."""
    store = await _open(v1_dir, _addr())
    try:
        after = store.index
        await store.propose({"op": "service_create", "id": "n1", "now": 1.0, "spec": NESTED})
        _, blobs = store.changes_since(after) or (0, [])
        logged = msgpack.unpackb(blobs[-1], raw=False)
        assert logged["spec"]["command"] == ["sleep", "1"] and "task" not in logged["spec"]
        assert schema.is_legacy_spec(logged["spec"])
        with pytest.raises(ValidationError) as exc:
            await store.propose({"op": "service_create", "id": "n2", "now": 1.0, "spec": {
                **NESTED, "name": "api2", "rollback": {"parallelism": 3}}})
        assert exc.value.field == "rollback.parallelism"
        # the full state a 0.1 worker would fetch is flat too
        _, raw = store.full_state()
        flat = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        assert all("command" in s["spec"] for s in flat["services"].values())
        assert all("name" in t["spec"] for t in flat["tasks"].values())
        assert state_from_bytes(raw).services["n1"].spec.task.container.command == ("sleep",
                                                                                     "1")
        res = await store.propose({"op": "cluster_schema", "schema": 2})
        assert res["changed"] and store.snapshot().cluster.schema == 2
        after = store.index
        await store.propose({"op": "service_create", "id": "n2", "now": 1.0, "spec": {
            **NESTED, "name": "api2", "rollback": {"parallelism": 3}}})
        _, blobs = store.changes_since(after) or (0, [])
        assert msgpack.unpackb(blobs[-1], raw=False)["spec"]["rollback"]["parallelism"] == 3
        with pytest.raises(CommandRejected):  # nor beyond what this code reads
            await store.propose({"op": "cluster_schema", "schema": schema.SCHEMA + 1})
    finally:
        store.close()


def test_state_bytes_round_trip_in_both_schemas() -> None:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": 2})
    assert st.cluster.schema == 2
    assert "ok" in st.apply({"op": "service_create", "id": "s", "now": 1.0, "spec": {
        **NESTED, "endpoint": {"ports": [{"published": 8080, "target": 80}]}}})
    assert state_from_bytes(state_to_bytes(st)) == st
    back = state_from_bytes(state_to_bytes(st, legacy=True))
    assert back.services == st.services and back.cluster == st.cluster


def test_a_snapshot_from_a_schema1_leader_is_installed(v1_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.1 leader sends its pickled dump as a snapshot; pysyncobj writes it where the dump
    goes and loads it with its Serializer. Its own pickle cannot (0.1's ServiceSpec records
    meet today's msgspec classes: "object.__new__(ServiceSpec) is not safe" — seen in a mixed
    cluster whose 0.1 leader had compacted its log); with the store's reader the state loads
    and is upgraded to the nested model."""
    import pysyncobj.pickle as pysyncobj_pickle
    import pysyncobj.serializer

    from shoal.raft import migrate
    from shoal.raft.store import ReplicatedState

    def received() -> Any:
        ser = pysyncobj.serializer.Serializer(str(v1_dir / "raft.dump"), 2 ** 16, False,
                                              None, None, None)
        return ser.deserialize()

    monkeypatch.setattr(pysyncobj.serializer, "pickle", pysyncobj_pickle)
    with pytest.raises(TypeError, match="not safe"):
        received()
    migrate.read_legacy_snapshots()
    dump = received()
    replica = ReplicatedState()
    replica._deserialize(dump[0][1])
    specs = [s.spec for s in replica.state.services.values()]
    assert specs and all(s.task.container.command or s.task.container.image for s in specs)
