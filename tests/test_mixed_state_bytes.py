"""A mixed-version cluster's replicas hold the same state, byte for byte (found by the fault
suite's mixed-version soak, tests/jepsen.py ``--old-release``).

While the cluster writes schema 10 (a node of the schema-10 release is in), today's state
machine applies a log as that release's does, and its whole state as bytes
(shoal.raft.wire ``state_to_bytes``: a worker's feed, the fault suite's digest) is what that
release writes for the same log: a field schema 10 never had (``Node.arch``, schema 11) is left
out, as ``strip_state`` leaves out the specs' later fields. Likewise at schema 11 against the
schema-11 release (schema 12's ``seccomp`` and ``starting_deadline`` left out), and at
schema 12 against the schema-12 release (schema 13's ``nocopy`` of a mount and ``host_ip`` of
a published port left out), and at schema 13 against the schema-13 release. The log is
what a today's leader writes: joins (every agent sends its arch), services (a scheduled job
among them), the leader's passes (spawns, assignments), compare-and-set scales, an update, a
drain.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
from typing import Any

import msgpack
import pytest

import oldrelease
from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.schema import encode_command
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_from_bytes, state_to_bytes

SCHEMA_10 = "ccf4cf4"  # the last commit of schema 10 (tests/test_node_arch_cluster.py)
SCHEMA_11 = "84c31e8"  # the last commit of schema 11
SCHEMA_12 = "3052b7c"  # the last commit of schema 12
SCHEMA_13 = "e9844df"  # the last commit of schema 13
NOW = 100.0

# applies a JSON list of commands (msgpack round trip, as the log carries them) with the
# release it runs in; prints each result and the state's bytes, hex
PROBE = """
import json, sys
import msgpack
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_to_bytes
st = ClusterState()
res = [st.apply(msgpack.unpackb(msgpack.packb(c, use_bin_type=True), raw=False,
                                strict_map_key=False)) for c in json.load(sys.stdin)]
print(json.dumps({"results": res, "state": state_to_bytes(st).hex()}))
"""


def _node(i: int, role: NodeRole) -> dict[str, Any]:
    return to_dict(Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
                        raft_port=2378, role=role, state=NodeState.READY,
                        memory_bytes=1 << 31, cpus=2.0, arch="x86_64"))


def _apply(st: ClusterState, log: list[dict[str, Any]], cmd: dict[str, Any]) -> None:
    """Encode ``cmd`` as the store's choke point does at the cluster's schema, apply it, log
    it."""
    cmd = encode_command(cmd, {}, st.cluster.schema if st.cluster.cluster_id else cmd["schema"])
    cmd = msgpack.unpackb(msgpack.packb(cmd, use_bin_type=True), raw=False,
                          strict_map_key=False)
    st.apply(cmd)
    log.append(cmd)


def _leader_pass(st: ClusterState, log: list[dict[str, Any]], ids: Any, term: int) -> None:
    seen = {nid: NOW for nid in st.nodes}
    ops, _ = plan_pass(st.snapshot(), seen, NOW, NOW, OrchestratorConfig(), liveness=True,
                       new_id=ids.__next__)
    if ops:
        _apply(st, log, {"op": "leader", "term": term, "now": NOW, "ops": ops})


def _mixed_log(schema: int) -> tuple[ClusterState, list[dict[str, Any]]]:
    st, log = ClusterState(), []
    ids = (f"t{i:04d}" for i in itertools.count())
    _apply(st, log, {"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                     "worker_secret": "", "manager_secret": "", "digest": "",
                     "schema": schema})
    for i, role in enumerate((NodeRole.MANAGER, NodeRole.MANAGER, NodeRole.WORKER), 1):
        _apply(st, log, {"op": "node_add", "now": 2.0, "node": _node(i, role)})
    for sid, mode in (("reg-0", {"replicas": 2}), ("web", {"replicas": 3}),
                      ("agent", {"type": "global"}),
                      ("nightly", {"type": "replicated-job", "schedule": {"cron": "@daily"}})):
        _apply(st, log, {"op": "service_create", "id": sid, "now": 3.0, "spec": {
            "name": sid, "task": {"container": {"command": ["sleep", "100000"]}},
            "mode": mode}})
    _leader_pass(st, log, ids, 1)
    version = st.services["reg-0"].version
    _apply(st, log, {"op": "service_update", "id": "reg-0", "replicas": 1, "version": version,
                     "now": 4.0})
    _apply(st, log, {"op": "service_update", "id": "reg-0", "replicas": 0, "version": version,
                     "now": 4.5})  # (refused: the version moved on)
    spec = to_dict(st.services["web"].spec)
    spec["task"]["container"]["env"] = {"GREETING": "hi"}
    # (a volume mount: its nocopy, schema 13's, left out below it)
    spec["task"]["container"]["mounts"] = [{"type": "volume", "source": "data",
                                            "target": "/data"}]
    # (a published port: its empty host_ip, schema 13's, left out below it)
    spec["endpoint"]["ports"] = [{"published": 8080, "target": 80}]
    _apply(st, log, {"op": "service_update", "id": "web", "spec": spec, "now": 5.0})
    _apply(st, log, {"op": "node_update", "id": "n3", "availability": "drain", "now": 6.0})
    _leader_pass(st, log, ids, 2)
    return st, log


@pytest.mark.parametrize(("schema", "release"), [(10, SCHEMA_10), (11, SCHEMA_11),
                                                 (12, SCHEMA_12), (13, SCHEMA_13)])
def test_below_todays_schema_its_replica_writes_the_state_bytes_the_older_release_does(
        schema: int, release: str) -> None:
    st, log = _mixed_log(schema)
    assert st.cluster.schema == schema and len(st.tasks) >= 5  # (the passes made tasks)
    with oldrelease.old_release(release) as rel:
        res = subprocess.run(rel.python_c(PROBE), input=json.dumps(log), capture_output=True,
                             text=True, check=False, timeout=60,
                             env={**os.environ, **rel.env}, cwd=rel.root)
    assert res.returncode == 0, res.stderr
    old = json.loads(res.stdout)
    today = ClusterState()
    results = json.loads(json.dumps([today.apply(cmd) for cmd in log]))
    assert results == old["results"]
    ours = state_to_bytes(today)
    theirs = bytes.fromhex(old["state"])
    if ours != theirs:  # say which records differ, not just two digests
        a = msgpack.unpackb(ours, raw=False, strict_map_key=False)
        b = msgpack.unpackb(theirs, raw=False, strict_map_key=False)
        diff = {f"{part}/{k}": (sorted(set(a[part][k]) ^ set(b[part].get(k, {})))
                                if isinstance(a[part][k], dict) else a[part][k])
                for part in a if isinstance(a[part], dict)
                for k in a[part] if a[part][k] != b.get(part, {}).get(k)}
        raise AssertionError(f"state bytes differ ({hashlib.sha256(ours).hexdigest()[:12]}"
                             f" != {hashlib.sha256(theirs).hexdigest()[:12]}): {diff}")
    # and the bytes still read back as the same state today
    assert state_to_bytes(state_from_bytes(ours)) == ours
