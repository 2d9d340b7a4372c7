"""Which members a node's gossip join pushes-pulls with (node/membership.py ``join_seeds``):
a handful at random, a manager among them — not every node of the cluster, which made a
100-worker join storm exchange ~10,000 member lists on 2 cores."""

from __future__ import annotations

import random

from shoal.node.membership import JOIN_SEEDS, join_seeds
from shoal.raft.models import Node, NodeRole


def _nodes(managers: int, workers: int) -> list[Node]:
    return [Node(id=f"{'m' if i < managers else 'w'}{i}", hostname=f"h{i}",
                 addr=f"10.0.{i // 250}.{i % 250 + 1}", api_port=2377, raft_port=2378,
                 gossip_port=7946,
                 role=NodeRole.MANAGER if i < managers else NodeRole.WORKER)
            for i in range(managers + workers)]


def test_a_join_asks_a_handful_of_members_always_one_manager() -> None:
    nodes = _nodes(5, 100)
    managers = {f"{n.addr}:7946" for n in nodes if n.role is NodeRole.MANAGER}
    me = nodes[50]
    for seed in range(50):
        rng = random.Random(seed)
        got = join_seeds(nodes, me.id, pick=lambda xs, k, rng=rng: rng.sample(xs, k))
        assert len(got) == JOIN_SEEDS == len(set(got))
        assert f"{me.addr}:7946" not in got and managers & set(got)


def test_small_clusters_and_clusters_without_managers() -> None:
    nodes = _nodes(1, 2)
    assert sorted(join_seeds(nodes, "w1")) == ["10.0.0.1:7946", "10.0.0.3:7946"]
    assert join_seeds(nodes[:1], "m0") == []
    workers = [n for n in _nodes(0, 8)]
    assert len(join_seeds(workers, "w0")) == JOIN_SEEDS
