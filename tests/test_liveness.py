"""Node liveness as a pure function (shoal.node.orchestrator.node_liveness): gossip states,
planned-restart marks and heartbeats in, READY/DOWN transitions out. No network, no clock."""

from __future__ import annotations

import pytest

from shoal.node.orchestrator import node_liveness
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.state import ClusterState, Snapshot


def snapshot(state: NodeState) -> Snapshot:
    st = ClusterState()
    node = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
                role=NodeRole.MANAGER, state=state)
    assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node)})
    if state is not NodeState.READY:  # node_add records a node as it is sent; be explicit
        st.apply({"op": "leader", "term": 0, "now": 1.0,
                  "ops": [("node_state", "n1", state.value, "test")]})
    return st.snapshot()


NOW = 100.0


@pytest.mark.parametrize(("case", "state", "gossip", "deadline", "expect"), [
    # a crash (no mark): down at once, as before
    ("crash is down", NodeState.READY, "dead", None, "down"),
    ("leave for good is down", NodeState.READY, "left", None, "down"),
    # a planned restart within its grace: no transition at all
    ("restart in progress, left", NodeState.READY, "left", NOW + 20, None),
    ("restart in progress, dead", NodeState.READY, "dead", NOW + 0.1, None),
    # past the grace: down like a crash
    ("restart overdue", NodeState.READY, "left", NOW, "down"),
    ("restart long overdue", NodeState.READY, "dead", NOW - 50, "down"),
    # back: the mark does not matter for a live member
    ("back from restart", NodeState.READY, "alive", NOW + 20, None),
    ("down node back", NodeState.DOWN, "alive", None, "ready"),
    ("suspect is not a death", NodeState.READY, "suspect", None, None),
    # a node already down stays down while an old mark is pending
    ("down stays down during a restart", NodeState.DOWN, "left", NOW + 20, None),
])
def test_planned_restart_keeps_a_node_up_only_within_its_grace(
        case: str, state: NodeState, gossip: str, deadline: float | None,
        expect: str | None) -> None:
    restarts = {"n1": deadline} if deadline is not None else {}
    ops = node_liveness(snapshot(state), {}, NOW, 4.0, {"n1": gossip}, restarts)
    got = ops[0][2] if ops else None
    assert got == expect, (case, ops)


def test_overdue_restart_names_the_reason() -> None:
    ops = node_liveness(snapshot(NodeState.READY), {}, NOW, 4.0, {"n1": "left"}, {"n1": NOW})
    assert ops and "restart" in ops[0][3] and "grace" in ops[0][3]


def test_heartbeats_decide_for_nodes_gossip_has_not_heard_of() -> None:
    snap = snapshot(NodeState.READY)
    assert node_liveness(snap, {"n1": NOW - 1}, NOW, 4.0, {}, {}) == []
    ops = node_liveness(snap, {"n1": NOW - 10}, NOW, 4.0, {}, {"n1": NOW + 30})
    assert ops[0][:3] == ("node_state", "n1", "down")  # a mark needs gossip to vouch for it


def test_within_the_leadership_grace_gossip_decides_and_heartbeats_wait() -> None:
    """A new leader (``gossip_only``): a node gossip saw die goes DOWN at once — it may have
    died with the old leader — while a node judged by heartbeats alone, whose beats may not
    have reached this leader yet, keeps its state."""
    snap = snapshot(NodeState.READY)
    ops = node_liveness(snap, {}, NOW, 4.0, {"n1": "dead"}, {}, gossip_only=True)
    assert ops[0][:3] == ("node_state", "n1", "down")
    assert node_liveness(snap, {"n1": NOW - 60}, NOW, 4.0, {}, {}, gossip_only=True) == []
    assert node_liveness(snapshot(NodeState.DOWN), {}, NOW, 4.0, {"n1": "alive"}, {},
                         gossip_only=True)[0][2] == "ready"
