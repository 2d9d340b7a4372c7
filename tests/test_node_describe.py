"""A node's description of itself (architecture, memory, CPUs) without a network: the
``node_describe`` command's validation and its schema-11 gate, ``node_add``'s arch below
schema 11 (checked against the schema-10 release's own state machine), the worker channel's
rule (a node describes only itself), the constraint ``node.platform.arch`` waiting for schema
11, the event a change gives, ``node inspect``'s platform, and the agent's Describer on the
in-memory store (shoal.node.describe).

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import oldrelease
from shoal.cli import pretty
from shoal.node import describe as describe_mod
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.describe import Describer, Description, describe_command
from shoal.node.errors import BadRequest, Forbidden
from shoal.node.events import derive
from shoal.node.pki import CertInfo
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.node.views import node_view
from shoal.raft.errors import ValidationError, WriteTimeout
from shoal.raft.models import Node, NodeRole, to_dict
from shoal.raft.schema import SCHEMA, encode_command
from shoal.raft.state import ClusterState

SCHEMA_10 = "ccf4cf4"  # the last commit of schema 10 (before compose-fixes raised it to 11)
ARCH = os.uname().machine
GOOD = {"arch": "aarch64", "memory_bytes": 1 << 32, "cpus": 4.0}


def _node(nid: str = "n1", last: int = 1, **kw: Any) -> dict[str, Any]:
    return to_dict(Node(id=nid, hostname=f"h{last}", addr=f"10.0.0.{last}", api_port=2377,
                        raft_port=2378, role=NodeRole.MANAGER if last == 1 else
                        NodeRole.WORKER, memory_bytes=1 << 33, cpus=2.0, **kw))


def _init(schema: int) -> dict[str, Any]:
    return {"op": "cluster_init", "cluster_id": "c1", "now": 1.0, "worker_secret": "",
            "manager_secret": "", "digest": "", "schema": schema}


def _state(schema: int, **node: Any) -> ClusterState:
    st = ClusterState()
    assert "ok" in st.apply(_init(schema))
    assert "ok" in st.apply({"op": "node_add", "now": 2.0, "node": _node(**node)})
    return st


def _describe(**fields: Any) -> dict[str, Any]:
    return {"op": "node_describe", "id": "n1", "now": 5.0, **GOOD, **fields}


# ------------------------------------------------------------------ the state machine
def test_a_join_at_schema_11_keeps_the_arch_and_below_it_keeps_none_without_refusing() -> None:
    assert _state(SCHEMA, arch="aarch64").nodes["n1"].arch == "aarch64"
    # (a schema-10 replica's decoder drops the key: today's does too, and takes the join)
    assert _state(10, arch="aarch64").nodes["n1"].arch == ""
    assert encode_command({"op": "node_add", "now": 2.0, "node": _node(arch="x86_64")},
                          {}, 10)["node"]["arch"] == "x86_64"  # (never refused on propose)
    # a name that is no architecture is not kept either; the join still goes
    assert _state(SCHEMA, arch="x86 64;rm").nodes["n1"].arch == ""


def test_node_describe_replaces_the_description_and_a_repeat_changes_nothing() -> None:
    st = _state(SCHEMA, arch="")
    before = st.nodes["n1"]
    assert st.apply(_describe()) == {"ok": True, "changed": True}
    after = st.nodes["n1"]
    assert (after.arch, after.memory_bytes, after.cpus, after.updated_at) == \
        ("aarch64", 1 << 32, 4.0, 5.0)
    assert replace(after, arch="", memory_bytes=before.memory_bytes, cpus=before.cpus,
                   updated_at=before.updated_at) == before  # (nothing else changed)
    assert st.apply(_describe(now=6.0)) == {"ok": True, "changed": False}
    assert st.nodes["n1"] is after
    res = st.apply(_describe(id="nope"))
    assert res["error"]["code"] == "not_found" and res["error"]["field"] == "id"


@pytest.mark.parametrize(("fields", "field"), [
    ({"arch": ""}, "arch"), ({"arch": "x86 64"}, "arch"), ({"arch": "a" * 33}, "arch"),
    ({"arch": 64}, "arch"), ({"arch": None}, "arch"),
    ({"memory_bytes": -1}, "memory_bytes"), ({"memory_bytes": 1.5}, "memory_bytes"),
    ({"memory_bytes": True}, "memory_bytes"), ({"memory_bytes": "8G"}, "memory_bytes"),
    ({"memory_bytes": 1 << 61}, "memory_bytes"),
    ({"cpus": -0.5}, "cpus"), ({"cpus": math.nan}, "cpus"), ({"cpus": math.inf}, "cpus"),
    ({"cpus": "4"}, "cpus"), ({"cpus": False}, "cpus"), ({"cpus": None}, "cpus"),
])
def test_a_bad_description_is_refused_naming_its_field(fields: dict[str, Any],
                                                       field: str) -> None:
    st = _state(SCHEMA)
    before = st.nodes["n1"]
    res = st.apply(_describe(**fields))
    assert res["error"]["code"] == "invalid" and res["error"]["field"] == field, res
    assert field in res["error"]["message"]
    assert st.nodes["n1"] is before


def test_node_describe_is_refused_below_schema_11_as_a_schema_10_replica_refuses_it() -> None:
    st = _state(10)
    before = st.nodes["n1"]
    res = st.apply(_describe())
    assert res == {"error": {"code": "invalid", "message": "unknown op 'node_describe'",
                             "field": "op"}}  # (shoal.raft.state.apply's for an unknown op)
    assert st.nodes["n1"] is before
    st.apply({"op": "cluster_schema", "schema": 11})
    assert st.apply(_describe())["ok"] and st.nodes["n1"].arch == "aarch64"


def test_an_arch_constraint_waits_for_schema_11_named_on_propose_and_by_the_state_machine(
) -> None:
    spec = {"name": "web", "task": {"container": {"command": ["sh"]},
                                    "placement": {"constraints": ["node.platform.arch==x86_64"]}}}
    cmd = {"op": "service_create", "id": "s1", "now": 3.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 10)
    assert exc.value.field == "task.placement.constraints" and "schema 11" in exc.value.message
    st = _state(10)
    res = st.apply(cmd)
    assert res["error"]["field"] == "task.placement.constraints" and not st.services
    other = {**spec, "task": {**spec["task"], "placement": {
        "constraints": ["node.platform.os==linux", "node.labels.arch==x86_64"]}}}
    assert encode_command({**cmd, "spec": other}, {}, 10)["spec"] == other  # (not the key)
    st.apply({"op": "cluster_schema", "schema": 11})
    assert st.apply(cmd)["ok"]
    assert encode_command(cmd, {}, 11) == cmd


def test_a_description_change_is_a_node_update_event_naming_what_changed() -> None:
    st = _state(SCHEMA, arch="x86_64")
    before = st.snapshot()
    cmd = _describe(arch="x86_64", memory_bytes=1 << 33, cpus=8.0)
    st.apply(cmd)
    (ev,) = derive(before, cmd, st.snapshot(), st.index)
    assert (ev.type, ev.action, ev.name) == ("node", "update", "h1")
    assert ev.attributes["cpus"] == 8.0
    assert "arch" not in ev.attributes and "memory_bytes" not in ev.attributes
    before = st.snapshot()
    st.apply(cmd)
    assert derive(before, cmd, st.snapshot(), st.index) == []


SCHEMA_10_PROBE = """
import json, sys
from shoal.raft.state import ClusterState
from shoal.raft.models import to_dict
st = ClusterState()
results = [st.apply(cmd) for cmd in json.load(sys.stdin)]
print(json.dumps({"results": results, "nodes": {k: to_dict(n) for k, n in st.nodes.items()},
                  "services": sorted(st.services)}))
"""


def test_below_schema_11_every_replica_holds_what_the_schema_10_release_holds() -> None:
    """The same log applied by shoal at schema 10 (the release before these commands) and by
    today's state machine at schema 10: the same node records (arch dropped), node_describe
    refused alike, the arch constraint refused by both."""
    log = [_init(10),
           {"op": "node_add", "now": 2.0, "node": _node(arch="aarch64")},
           {"op": "node_add", "now": 2.5, "node": _node("n2", 2, arch="x86_64")},
           _describe(),
           {"op": "service_create", "id": "s1", "now": 6.0, "spec": {
               "name": "web", "task": {"container": {"command": ["sh"]}, "placement": {
                   "constraints": ["node.platform.arch==aarch64"]}}}}]
    with oldrelease.old_release(SCHEMA_10) as rel:
        res = subprocess.run(rel.python_c(SCHEMA_10_PROBE), input=json.dumps(log),
                             capture_output=True, text=True, check=False, timeout=60,
                             env={**os.environ, **rel.env}, cwd=rel.root)
    assert res.returncode == 0, res.stderr
    old = json.loads(res.stdout)
    st = ClusterState()
    today = json.loads(json.dumps([st.apply(cmd) for cmd in log]))
    assert [r.get("ok", False) for r in today] == [r.get("ok", False) for r in old["results"]]
    assert today[3] == old["results"][3]  # (node_describe: the very same refusal)
    assert "error" in old["results"][4] and "error" in today[4] and old["services"] == []
    ours = {k: json.loads(json.dumps(to_dict(n))) for k, n in st.nodes.items()}
    assert all(n.pop("arch") == "" for n in ours.values())
    assert ours == old["nodes"]


# ------------------------------------------------------------------ the worker channel
def _manager(tmp_path: Path, schema: int = SCHEMA) -> tuple[MemoryStore, NodeContext]:
    store = MemoryStore(self_addr="10.0.0.1:2378")
    ctx = NodeContext(AgentConfig(data_dir=tmp_path, advertise_addr="10.0.0.1"), "h1")
    ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager", raft_password="",
                         voters=["10.0.0.1:2378"]), store, store)
    store.state.apply(_init(schema))
    store.state.apply({"op": "node_add", "now": 2.0, "node": _node()})
    store.state.apply({"op": "node_add", "now": 2.0, "node": _node("w1", 2)})
    return store, ctx


async def test_a_worker_describes_only_itself_through_the_dispatcher(tmp_path: Path) -> None:
    store, ctx = _manager(tmp_path)
    dispatcher = Dispatcher(ctx, Security(ctx), lambda: None)
    peer = CertInfo("w1", "worker", "c1", 1, 0.0, 4e9)
    with pytest.raises(Forbidden, match="only describe itself"):
        await dispatcher.worker_report(peer, {"op": "node_describe", "id": "n1", **GOOD})
    assert store.snapshot().nodes["n1"].arch == ""
    with pytest.raises(BadRequest) as exc:
        await dispatcher.worker_report(peer, {"op": "node_describe", "id": "w1",
                                              **GOOD, "cpus": -1})
    assert exc.value.field == "cpus"
    out = await dispatcher.worker_report(peer, {"op": "node_describe", "id": "w1", **GOOD,
                                                "now": 1e12})  # (a clock far ahead)
    assert out["result"] == {"ok": True, "changed": True}
    w1 = store.snapshot().nodes["w1"]
    assert (w1.arch, w1.memory_bytes, w1.cpus) == ("aarch64", 1 << 32, 4.0)
    assert w1.updated_at < 1e11  # (stamped with the manager's time)


# ------------------------------------------------------------------ the agent's Describer
def test_describe_command_only_when_caught_up_at_schema_11_and_the_record_differs() -> None:
    own = Description(arch="aarch64", memory_bytes=1 << 32, cpus=4.0)
    rec = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
               role=NodeRole.WORKER)
    assert describe_command("n1", None, SCHEMA, own) is None  # (not caught up yet)
    assert describe_command("n1", rec, 10, own) is None
    assert describe_command("n1", rec, SCHEMA, own) == {"op": "node_describe", "id": "n1",
                                                        **GOOD}
    same = replace(rec, arch="aarch64", memory_bytes=1 << 32, cpus=4.0)
    assert describe_command("n1", same, SCHEMA, own) is None
    assert describe_command("n1", replace(same, memory_bytes=1 << 31), SCHEMA, own) is not None
    mine = describe_mod.own_description()
    assert mine.arch == ARCH and mine.memory_bytes > 0 and mine.cpus >= 1


async def _until(pred: Any, what: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_describer_fills_a_blank_record_once_the_schema_is_raised_and_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent whose record has no arch (it joined below schema 11) sends nothing while the
    cluster writes schema 10; the leader raises the schema while it runs and it describes
    itself; a failed send is retried; a changed description (memory) is sent again."""
    monkeypatch.setattr(describe_mod, "CHECK_GAP", 0.01)
    monkeypatch.setattr(describe_mod, "RETRY_MIN", 0.02)
    monkeypatch.setattr(describe_mod, "REFRESH", 0.05)
    store, ctx = _manager(tmp_path, schema=10)
    wakeup = asyncio.Event()
    store.add_listener(lambda _i: wakeup.set())
    own = [Description(arch="aarch64", memory_bytes=1 << 32, cpus=4.0)]
    describer = Describer(ctx, "n1", wakeup, describe=lambda: own[0])
    fail = [1]
    real = store.propose

    async def flaky(cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if cmd.get("op") == "node_describe" and fail[0]:
            fail[0] -= 1
            raise WriteTimeout("write not committed: no leader")
        return await real(cmd, timeout)
    monkeypatch.setattr(store, "propose", flaky)
    run = asyncio.create_task(describer.run())
    try:
        await asyncio.sleep(0.2)
        assert describer.sent == 0 and store.snapshot().nodes["n1"].arch == ""
        await store.propose({"op": "cluster_schema", "schema": 11})
        await _until(lambda: store.snapshot().nodes["n1"].arch == "aarch64",
                     "the record described")
        assert fail == [0] and describer.sent == 1
        assert store.snapshot().nodes["n1"].memory_bytes == 1 << 32
        own[0] = replace(own[0], memory_bytes=1 << 33)  # (memory added under the agent)
        await _until(lambda: store.snapshot().nodes["n1"].memory_bytes == 1 << 33,
                     "the new memory in the record")
        assert describer.sent == 2
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run


# ------------------------------------------------------------------ node inspect
def test_node_inspect_shows_the_platform_as_docker_does(tmp_path: Path) -> None:
    store, _ = _manager(tmp_path)
    store.state.apply({"op": "node_describe", "id": "w1", "now": 3.0, **GOOD})
    snap = store.snapshot()
    rec = node_view(snap.nodes["w1"], snap, store, detail=True)
    assert rec["platform"] == {"os": "linux", "architecture": "aarch64"}
    assert rec["resources"]["memory_bytes"] == 1 << 32 and rec["resources"]["cpus"] == 4.0
    lines = pretty.node(json.loads(json.dumps(rec))).splitlines()
    at = lines.index("Platform:")
    assert lines[at + 1:at + 3] == [" Operating System:\tlinux", " Architecture:\t\taarch64"]
    blank = node_view(snap.nodes["n1"], snap, store, detail=True)
    assert blank["platform"] == {"os": "linux", "architecture": ""}
    lines = pretty.node(blank).splitlines()
    assert lines[lines.index("Platform:") + 2] == "Resources:"  # (no Architecture line)
