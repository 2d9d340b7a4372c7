"""The schema gate of a rolling upgrade (node/upgrade.py), table-tested without network or root,
and the leader loop proposing what it decides, on the in-memory store.

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgpack
import pytest

from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore
from shoal.node.upgrade import (
    META_KEY,
    SCHEMA,
    announced_schema,
    cluster_schema,
    gossip_meta,
    join_refusal,
    schema_to_raise,
)
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.state import ClusterInfo, Snapshot

_ADDRS = {"m1": "10.0.0.1", "m2": "10.0.0.2", "w1": "10.0.0.3"}


def _node(nid: str, role: NodeRole, state: NodeState = NodeState.READY) -> Node:
    return Node(id=nid, hostname=nid, addr=_ADDRS[nid], api_port=2377, raft_port=2378,
                role=role, state=state)


def _snap(schema: int | None = None) -> Snapshot:
    """Two managers (one down) and a worker; the cluster at ``schema`` (None: a state written
    before ClusterInfo had a schema)."""
    cluster = ClusterInfo(cluster_id="c1")
    if schema is not None:
        cluster.schema = schema  # type: ignore[attr-defined,unused-ignore]
    nodes = {"m1": _node("m1", NodeRole.MANAGER),
             "m2": _node("m2", NodeRole.MANAGER, NodeState.DOWN),
             "w1": _node("w1", NodeRole.WORKER)}
    return Snapshot(index=7, cluster=cluster, nodes=nodes, services={}, tasks={})


OLD: dict[str, Any] = {"role": "manager", "hostname": "x", "api": "10.0.0.1:2377"}  # 0.1
NEW: dict[str, Any] = {**OLD, META_KEY: 2}


@pytest.mark.parametrize(("name", "cluster", "metas", "expected"), [
    ("every node announces 2: raise to 2", None,
     {"m1": NEW, "m2": NEW, "w1": NEW}, 2),
    ("a worker still runs 0.1 (no mark): nothing", None,
     {"m1": NEW, "m2": NEW, "w1": OLD}, None),
    ("a down manager announced 2 before going down: it counts", None,
     {"m1": NEW, "m2": NEW, "w1": NEW}, 2),
    ("a node gossip never heard of counts as schema 1", None,
     {"m1": NEW, "w1": NEW}, None),
    ("already at 2: nothing", 2, {"m1": NEW, "m2": NEW, "w1": NEW}, None),
    ("a node announces 3, the others 2: raise to 2 only", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: 3}, "w1": NEW}, 2),
    ("everyone announces 3 but this leader runs 2: capped at its own", None,
     {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}, 2),
    ("at 2, everyone announces 3 but this leader runs 2: nothing", 2,
     {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}, None),
    ("a malformed mark (string) counts as schema 1", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: "2"}, "w1": NEW}, None),
    ("a boolean mark counts as schema 1", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: True}, "w1": NEW}, None),
    ("metadata of nodes no longer in the cluster is ignored", None,
     {"m1": NEW, "m2": NEW, "w1": NEW, "gone": OLD}, 2),
])
def test_schema_to_raise_only_when_every_node_of_the_snapshot_announces_it(
        name: str, cluster: int | None, metas: Mapping[str, Mapping[str, Any]],
        expected: int | None) -> None:
    assert schema_to_raise(_snap(cluster), metas, own=2) == expected, name  # (a 0.2 leader)


def test_a_leader_running_a_newer_schema_raises_to_what_every_node_can_run() -> None:
    """own=3 (a later release leading): a cluster at 2 with every node on 3 goes to 3; with
    one node on 2 it stays."""
    three = {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}
    assert schema_to_raise(_snap(2), three, own=3) == 3
    assert schema_to_raise(_snap(2), {**three, "w1": NEW}, own=3) is None


def test_an_empty_cluster_raises_nothing() -> None:
    snap = Snapshot(index=0, cluster=ClusterInfo(), nodes={}, services={}, tasks={})
    assert schema_to_raise(snap, {}) is None


def test_a_state_without_a_schema_is_schema_1_and_this_code_announces_its_own() -> None:
    assert cluster_schema(_snap()) == 1
    assert announced_schema(None) == 1 and announced_schema(OLD) == 1
    meta = gossip_meta("worker", "h4", "10.0.0.4:2377")
    assert meta == {"role": "worker", "hostname": "h4", "api": "10.0.0.4:2377",
                    META_KEY: SCHEMA}
    assert announced_schema(meta) == SCHEMA == 14


class _Cluster:
    """A manager and a worker on the in-memory store, led by a LeaderLoop whose gossip
    metadata the test sets."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.metas: dict[str, dict[str, Any]] = {}
        self.leader = LeaderLoop(self.store, {}, OrchestratorConfig(), asyncio.Event(),
                                 gossip_meta=lambda: self.metas)

    async def boot(self) -> None:
        await self.store.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                                  "worker_secret": "", "manager_secret": "", "digest": ""})
        for nid, role in (("m1", NodeRole.MANAGER), ("w1", NodeRole.WORKER)):
            await self.store.propose({"op": "node_add", "now": 1.0,
                                      "node": to_dict(_node(nid, role))})

    def schema_commands(self) -> list[dict[str, Any]]:
        _, blobs = self.store.changes_since(0) or (0, [])
        cmds = [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in blobs]
        return [c for c in cmds if c.get("op") == "cluster_schema"]


async def test_the_leader_proposes_cluster_schema_once_and_only_when_every_node_announces(
        ) -> None:
    """While the worker runs 0.1 no pass proposes; once it announces 2 one pass proposes
    ``cluster_schema`` 2, and later passes do not propose it again (raised, or refused by a
    state machine that does not know it: either way, no write per pass)."""
    c = _Cluster()
    await c.boot()
    c.metas = {"m1": NEW, "w1": OLD}
    await c.leader.one_pass()
    await c.leader.one_pass()
    assert c.schema_commands() == []

    c.metas = {"m1": NEW, "w1": NEW}
    await c.leader.one_pass()
    assert c.schema_commands() == [{"op": "cluster_schema", "schema": 2}]
    for _ in range(3):
        await c.leader.one_pass()
    assert len(c.schema_commands()) == 1


async def test_a_leader_without_gossip_metadata_never_proposes_a_schema() -> None:
    c = _Cluster()
    c.leader.gossip_meta = None
    await c.boot()
    await c.leader.one_pass()
    assert c.schema_commands() == []


@pytest.mark.parametrize(("cluster", "joiner", "refused"), [
    (None, None, False),  # a 0.1 cluster takes a 0.1 node
    (None, 2, False),  # and a node on today's code
    (2, 2, False),
    (2, 3, False),  # a newer agent joins an older cluster (it reads the older schema)
    (2, None, True),  # after the raise, a 0.1 agent (its request says nothing) is refused
    (2, 1, True),
    (2, "2", True),  # a malformed mark counts as schema 1
])
def test_a_node_whose_code_cannot_read_the_cluster_schema_is_refused_at_join(
        cluster: int | None, joiner: Any, refused: bool) -> None:
    problem = join_refusal(_snap(cluster), joiner)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert "upgrade shoal on this node" in problem


# ------------------------------------------------------------------ fields after schema 2

POD = {"name": "web", "mode": {"replicas": 2},
       "task": {"container": {"command": ["web"]},
                "sidecars": [{"name": "probe", "command": ["probe"]}]}}
AUTO = {"name": "auto", "mode": {"replicas": 1, "autoscale": {"max": 3, "cpu": 0.5}},
        "task": {"container": {"command": ["x"]}, "resources": {"limits": {"cpu": 0.2}}}}
PLAIN = {"name": "plain", "task": {"container": {"command": ["x"]}}}
HOSTNET = {"name": "hostnet", "task": {"container": {"command": ["x"]}, "network_mode": "host"}}
ENTRY = {"name": "entry", "task": {"container": {"image": "busybox:1", "command": ["-c", "x"],
                                                  "entrypoint": ["/bin/sh"]}}}
EXEC = {"name": "exec", "task": {"container": {"command": ["x"],
                                                "healthcheck": {"exec": ["/bin/check"]}}}}
SECURE = {"name": "secure", "task": {"container": {"command": ["x"], "read_only": True}}}
CAPS = {"name": "caps", "task": {"container": {"command": ["x"], "cap_add": ["NET_ADMIN"]}}}
ULIMIT = {"name": "ulim", "task": {"container": {"command": ["x"], "ulimits": [
    {"name": "nofile", "soft": 1024, "hard": 2048}]}}}
SYSCTL = {"name": "sysctl", "task": {"container": {"command": ["x"],
                                                   "sysctls": {"net.core.somaxconn": "1024"}}}}
HOSTS = {"name": "hosts", "task": {"container": {"command": ["x"],
                                                 "extra_hosts": ["db:10.0.0.9"]}}}
TEMPLATE = {"name": "tpl", "task": {"container": {"command": ["x"],
                                                 "hostname": "{{.Node.Hostname}}-db"}}}
ALIASES = {"name": "al", "task": {"container": {"command": ["x"]}, "networks": ["back"],
                                  "network_aliases": {"back": ["db"]}}}
_LATER = ("sidecars", "init_containers", "network_mode")


def _state(schema: int) -> Any:
    from shoal.raft.state import ClusterState
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": schema})
    return st


def test_a_spec_without_the_later_fields_is_written_as_an_older_0_2_node_writes_it() -> None:
    """At cluster schema 2 (a node may run a 0.2 that predates pods and autoscaling, whose
    strict decoder refuses keys it does not know), a spec that does not use task.sidecars,
    task.init_containers or mode.autoscale goes into the log, the leader's task creates and
    the full state without them, and reads back the same; at schema 3, whole."""
    from shoal.raft.models import to_dict
    from shoal.raft.schema import encode_command
    from shoal.raft.validate import validate_spec
    from shoal.raft.wire import state_from_bytes, state_to_bytes

    full = to_dict(validate_spec(PLAIN))  # (as the API proposes it: every field)
    cmd = encode_command({"op": "service_create", "id": "s1", "now": 1.0, "spec": full}, {},
                         2)
    assert not set(_LATER) & cmd["spec"]["task"].keys()
    assert "autoscale" not in cmd["spec"]["mode"] and cmd["spec"]["mode"]["replicas"] == 1
    assert full["task"]["sidecars"] == [] and "autoscale" in full["mode"]  # (not mutated)
    assert validate_spec(cmd["spec"]) == validate_spec(full)
    st = _state(2)
    assert st.apply(cmd)["ok"]
    create = ("create", {"id": "t1", "service_id": "s1", "service_name": "plain", "slot": 1,
                         "spec": full["task"], "service_version": 1,
                         "desired_state": 512, "status": {"state": 0}})
    led = encode_command({"op": "leader", "term": 1, "now": 2.0, "ops": [create]}, {}, 2)
    assert not set(_LATER) & led["ops"][0][1]["spec"].keys()
    assert st.apply(led)["ok"]
    raw = msgpack.unpackb(state_to_bytes(st), raw=False, strict_map_key=False)
    assert not set(_LATER) & raw["services"]["s1"]["spec"]["task"].keys()
    assert "autoscale" not in raw["services"]["s1"]["spec"]["mode"]
    assert not set(_LATER) & raw["tasks"]["t1"]["spec"].keys()
    assert "entrypoint" not in raw["tasks"]["t1"]["spec"]["container"]
    assert not {"read_only", "cap_add", "sysctls"} & raw["tasks"]["t1"]["spec"]["container"].keys()
    back = state_from_bytes(state_to_bytes(st))
    assert back.services["s1"].spec == st.services["s1"].spec
    assert back.tasks["t1"].spec == st.tasks["t1"].spec
    assert encode_command(cmd, {}, SCHEMA) is cmd  # (once raised: as is)
    st.apply({"op": "cluster_schema", "schema": SCHEMA})
    raw = msgpack.unpackb(state_to_bytes(st), raw=False, strict_map_key=False)
    assert raw["services"]["s1"]["spec"]["task"]["sidecars"] == []


@pytest.mark.parametrize(("spec", "field"), [(POD, "task.sidecars"),
                                             (AUTO, "mode.autoscale"),
                                             (HOSTNET, "task.network_mode"),
                                             (ENTRY, "task.container.entrypoint"),
                                             (EXEC, "task.container.healthcheck.exec"),
                                             (SECURE, "task.container.read_only"),
                                             (CAPS, "task.container.cap_add"),
                                             (ULIMIT, "task.container.ulimits"),
                                             (SYSCTL, "task.container.sysctls"),
                                             (HOSTS, "task.container.extra_hosts"),
                                             (TEMPLATE, "task.container.hostname")])
def test_a_spec_using_a_later_field_is_refused_naming_it_until_every_node_reads_it(
        spec: dict[str, Any], field: str) -> None:
    """On propose (encode) and by the state machine alike (an older replica refuses it
    too); once the cluster is at schema 3 it goes."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 2)
    assert exc.value.field == field and "upgrade every node first" in exc.value.message
    st = _state(2)
    res = st.apply(cmd)
    assert res["error"]["field"] == field and "s1" not in st.services
    if field == "task.sidecars":  # a task of a pod service made before the gate existed
        task = ("create", {"id": "t1", "service_id": "s0", "service_name": "web", "slot": 1,
                           "spec": spec["task"], "service_version": 1})
        led = encode_command({"op": "leader", "term": 1, "now": 2.0,
                              "ops": [task, ("delete", "t0")]}, {}, 2)
        assert led["ops"] == [("delete", "t0")]  # left out; the leader's other ops go on
    st.apply({"op": "cluster_schema", "schema": SCHEMA})
    assert encode_command(cmd, {}, SCHEMA) is cmd and st.apply(cmd)["ok"]


def test_schema_7s_fields_and_values_are_refused_by_a_schema_6_cluster() -> None:
    """The last gate: what schema 6's code cannot read (network aliases; placeholders in a
    host name, which its host name pattern refuses) waits for schema 7; a plain host name
    does not."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    rt = {"name": "rt", "task": {"container": {"command": ["x"], "stop_signal": "SIGRTMIN+3"}}}
    for spec, field in ((ALIASES, "task.network_aliases"), (TEMPLATE, "task.container.hostname"),
                        (SECURE, "task.container.read_only"), (rt, "task.container.stop_signal")):
        cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
        with pytest.raises(ValidationError) as exc:
            encode_command(cmd, {}, 6)
        assert exc.value.field == field and "schema 7" in exc.value.message
        assert encode_command(cmd, {}, 7) == cmd
    # placeholders in env and mounts: refused on propose (an older node would not fill them
    # in), though the state machine takes them as older replicas do
    for where, container in (("task.container.env.WHO", {"env": {"WHO": "{{.Task.Slot}}"}}),
                             ("task.container.mounts[0]", {"mounts": [{
                                 "type": "tmpfs", "target": "/d/{{.Task.Slot}}"}]}),
                             ("task.container.mounts", {"mounts": [{
                                 "type": "volume", "source": "d-{{.Task.Slot}}",
                                 "target": "/d"}]})):
        spec = {"name": "t", "task": {"container": {"command": ["x"], **container}}}
        cmd = {"op": "service_create", "id": "s3", "now": 1.0, "spec": spec}
        with pytest.raises(ValidationError) as exc:
            encode_command(cmd, {}, 6)
        assert exc.value.field == where
        st = _state(6)
        res = st.apply(cmd)
        assert ("error" in res) == (where == "task.container.mounts"), res
    plain = {"name": "p", "task": {"container": {"command": ["x"], "hostname": "db-1",
                                                  "stop_signal": "SIGQUIT"}}}
    cmd = {"op": "service_create", "id": "s2", "now": 1.0, "spec": plain}
    assert encode_command(cmd, {}, 6)["spec"]["task"]["container"]["hostname"] == "db-1"


@pytest.mark.parametrize(("name", "value"), [("tty", True), ("stdin_open", True),
                                             ("oom_score_adj", 500),
                                             ("labels", {"com.example.team": "web"})])
def test_schema_8s_container_fields_wait_for_every_node_to_read_them(name: str,
                                                                      value: Any) -> None:
    """A schema-7 node's decoder does not know them: refused naming the field on propose
    and by the state machine, as an older replica does, until the schema is 8; a spec that
    leaves them at their defaults goes as before."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    spec = {"name": "t", "task": {"container": {"command": ["sh"], name: value}}}
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 7)
    assert exc.value.field == f"task.container.{name}" and "schema 8" in exc.value.message
    st = _state(7)
    assert st.apply(cmd)["error"]["field"] == f"task.container.{name}"
    st.apply({"op": "cluster_schema", "schema": 8})
    assert encode_command(cmd, {}, 8) == cmd and st.apply(cmd)["ok"]
    plain = {"op": "service_create", "id": "s2", "now": 1.0,
             "spec": {"name": "p", "task": {"container": {"command": ["sh"]}}}}
    assert "tty" not in encode_command(plain, {}, 7)["spec"]["task"]["container"]


async def test_the_autoscale_op_is_neither_proposed_nor_applied_below_schema_3() -> None:
    """An older 0.2 replica does not know the leader's ``autoscale`` op (it refuses the
    batch): the leader's autoscaler plans none, encoding leaves one out, and today's state
    machine refuses it as the older one does, so every replica applies the same."""
    from shoal.node.autoscale import Autoscaler
    from shoal.raft.schema import encode_command

    st = _state(SCHEMA)
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": AUTO})["ok"]
    st.cluster.schema = 2  # (as a cluster created by the code before this gate can be)
    asked: list[Any] = []

    async def usage(by_node: Any) -> dict[str, Any]:
        asked.append(by_node)
        return {}

    scaler = Autoscaler(usage)
    assert await scaler.plan(st.snapshot(), 100.0) == [] and not scaler.services
    decision = {"current": 1, "desired": 3, "usage": 1.2, "target": 0.5, "metric": "cpu",
                "tasks": 1, "reason": "up"}
    cmd = {"op": "leader", "term": 1, "now": 5.0, "ops": [("autoscale", "s1", 3, decision)]}
    assert encode_command(cmd, {}, 2)["ops"] == []  # (left out: the rest of a batch goes)
    assert st.apply(cmd)["error"]["message"] == "unknown leader op 'autoscale'"
    assert st.services["s1"].spec.mode.replicas == 1
    st.cluster.schema = SCHEMA
    assert st.apply(cmd)["ok"] and st.services["s1"].spec.mode.replicas == 3


def test_the_task_history_limit_waits_for_schema_8_and_names_a_bad_value() -> None:
    """`cluster_update` is a command schema 7's code does not know: refused alike by today's
    state machine until the cluster is at 8; then set, cleared (None) and range-checked."""
    st = _state(7)
    res = st.apply({"op": "cluster_update", "task_history_limit": 1})
    assert res["error"]["field"] == "op" and st.cluster.task_history_limit is None
    st.apply({"op": "cluster_schema", "schema": 8})
    assert st.apply({"op": "cluster_update", "task_history_limit": 1})["ok"]
    assert st.cluster.task_history_limit == 1
    for bad in (-1, 1001, True, "5"):
        res = st.apply({"op": "cluster_update", "task_history_limit": bad})
        assert res["error"]["field"] == "task_history_limit", bad
    assert st.cluster.task_history_limit == 1
    assert st.apply({"op": "cluster_update", "task_history_limit": None})["ok"]
    assert st.cluster.task_history_limit is None


@pytest.mark.parametrize(("container", "field"), [
    ({"env": {"discovery.type": "single-node"}}, "task.container.env"),
    ({"stop_grace_period": 7200.0}, "task.container.stop_grace_period"),
    ({"extra_hosts": ["host.docker.internal:host-gateway"]}, "task.container.extra_hosts"),
])
def test_schema_11s_values_wait_for_every_node_to_take_them(container: dict[str, Any],
                                                            field: str) -> None:
    """What schema 10's validation refused on every replica (an env name with a dot, a grace
    period over an hour, Docker's host-gateway) is refused naming the field, on propose and
    by the state machine, until the schema is 11; the values schema 10 took go as before."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    spec = {"name": "t", "task": {"container": {"command": ["sh"], **container}}}
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 10)
    assert exc.value.field == field and "schema 11" in exc.value.message
    st = _state(10)
    assert st.apply(cmd)["error"]["field"] == field
    st.apply({"op": "cluster_schema", "schema": 11})
    assert "error" not in st.apply(cmd)
    plain = {"name": "p", "task": {"container": {"command": ["sh"], "env": {"A_1": "x"},
                                                  "stop_grace_period": 3600.0,
                                                  "extra_hosts": ["db:10.0.0.2"]}}}
    assert encode_command({"op": "service_create", "id": "s2", "now": 1.0, "spec": plain},
                          {}, 10)["spec"] == plain


def test_a_sidecars_env_name_with_a_dot_waits_for_schema_11_too() -> None:
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    spec = {"name": "t", "task": {"container": {"command": ["sh"]}, "sidecars": [
        {"name": "log", "command": ["sh"], "env": {"a.b": "1"}}]}}
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 10)
    assert exc.value.field == "task.sidecars"
    assert encode_command(cmd, {}, 11) == cmd
