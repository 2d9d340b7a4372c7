"""The state as a Raft snapshot holds it (raft/store.py ``_serialize``, raft/wire.py), pure:
converting each shared task template once gives byte for byte the encoding of the plain walk,
decoding gives the tasks their service's template object back, and the snapshot value
pysyncobj pickles (in its compaction child) unpickles as those bytes."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
from helpers import free_ports, until
from test_networks_state import cluster, ok

from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.raft.models import to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.store import RaftStore, ReplicatedState
from shoal.raft.wire import state_from_bytes, state_to_bytes


def _state() -> ReplicatedState:
    consumer = ReplicatedState()
    st = consumer.state = cluster()
    for sid in ("s1", "s2"):
        ok(st, op="service_create", id=sid, spec={"name": sid, "command": ["sleep", "9"],
                                                   "replicas": 3})
    seen = dict.fromkeys(st.nodes, 1.0)
    ops, _ = plan_pass(st.snapshot(), seen, 1.0, 2.0, OrchestratorConfig())
    first = next(op for op in ops if op[0] == "create")
    own = to_dict(st.services["s2"].spec.task)  # one task with a template of its own
    own["container"]["command"] = ["sleep", "10"]
    ops.append(("create", {**first[1], "id": "own", "slot": 4, "service_id": "s2",
                           "spec": own}))
    ok(st, op="leader", term=1, ops=ops)
    s1 = [t for t in st.tasks.values() if t.service_id == "s1"]
    assert len(s1) == 3 and s1[0].spec is s1[1].spec  # (shared: what the memo keys on)
    return consumer


def test_shared_templates_encode_as_the_plain_walk_does() -> None:
    st = _state().state
    blob = state_to_bytes(st)
    assert blob == msgpack.packb(to_dict(st), use_bin_type=True)
    back = state_from_bytes(blob)
    assert back.tasks == st.tasks and back.services == st.services
    assert list(back.tasks["own"].spec.container.command) == ["sleep", "10"]
    # decoded, the tasks share their service's template again (one object, not one per task)
    for t in back.tasks.values():
        assert (t.spec is back.services[t.service_id].spec.task) is (t.id != "own"), t.id


def test_the_snapshot_value_pickles_as_the_state_bytes() -> None:
    consumer = _state()
    data = consumer._serialize()
    loaded = pickle.loads(pickle.dumps((data, ("cmd", 1, 1))))
    assert loaded[0] == {"state_v2": state_to_bytes(consumer.state)}
    fresh = ReplicatedState()
    fresh._deserialize(loaded[0])
    assert fresh.state.tasks == consumer.state.tasks


async def test_full_state_is_the_state_encoded(tmp_path: Path) -> None:
    """RaftStore.full_state (a worker's catch-up) encodes a snapshot outside the state lock:
    the same bytes as the state itself, every field included."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(addr, [addr], tmp_path, None, persist=False)
    try:
        await until(store.is_leader, 20.0)
        await store.propose({"op": "cluster_init", "cluster_id": "c", "now": 1.0,
                             "worker_secret": "", "manager_secret": "", "digest": "",
                             "schema": SCHEMA})
        await store.propose({"op": "service_create", "id": "s1", "now": 1.0,
                             "spec": {"name": "web", "command": ["true"]}})
        index, blob = store.full_state()
        with store.consumer._lock:
            assert index == store.consumer.state.index
            assert blob == state_to_bytes(store.consumer.state)
        assert state_from_bytes(blob).services["s1"].spec.name == "web"
    finally:
        store.close()
