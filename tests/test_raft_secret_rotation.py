"""Rotating the Raft secret: the transport's keyring and the replicated phases (units).

The end-to-end rotation (managers switching over with a manager down, which then recovers)
is in tests/test_autolock_cluster.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from shoal.raft.errors import Rejected
from shoal.raft.raftkeys import raft_rotate_start, secret_id
from shoal.raft.state import ClusterState
from shoal.raft.transport import AeadEncryptor


def _token(enc: AeadEncryptor, data: bytes = b"append_entries") -> bytes:
    return enc.encrypt_at_time(data, int(time.time()))


def test_the_keyring_sends_with_the_primary_and_opens_with_every_secret() -> None:
    old, new = AeadEncryptor("old"), AeadEncryptor("new")
    ring = AeadEncryptor("old", ["new"])  # phase accept: sends old, opens both
    assert ring.decrypt(_token(old)) == b"append_entries"
    assert ring.decrypt(_token(new)) == b"append_entries"
    assert old.decrypt(_token(ring)) == b"append_entries"
    ring.set_secrets("new", ["old"])  # phase switch: sends new
    assert new.decrypt(_token(ring)) == b"append_entries"
    with pytest.raises(InvalidTag):
        old.decrypt(_token(ring))
    ring.set_secrets("new")  # done: the old secret opens nothing any more
    assert ring.unknown_tokens == 0
    with pytest.raises(InvalidTag):
        ring.decrypt(_token(old))
    assert ring.unknown_tokens == 1 and ring.last_unknown > 0  # what triggers a fetch


def _state() -> ClusterState:
    s = ClusterState()
    assert "ok" in s.apply({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                            "digest": "0" * 64, "worker_secret": "w", "manager_secret": "m",
                            "schema": 2})
    assert "ok" in s.apply({"op": "node_add", "now": 1.0, "node": {
        "id": "m1", "hostname": "m1", "addr": "10.0.0.1", "api_port": 2377,
        "raft_port": 2378, "role": "manager"}})
    return s


def _ok(s: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    out = s.apply(cmd)
    assert "ok" in out, out
    return out


def test_the_phases_in_order_and_stale_or_bad_commands_refused() -> None:
    s = _state()
    assert s.cluster.schema == 2
    a, b = secret_id("a"), secret_id("b")
    assert len(a) == 16 and a != b
    _ok(s, {"op": "raft_rotate_start", "key_id": a})
    assert (s.cluster.raft_phase, s.cluster.raft_next_key_id) == ("accept", a)
    # not yet every ack: the phase command is the leader's; an ack for another id is stale
    assert _ok(s, {"op": "raft_rotate_ack", "node_id": "m1", "stage": 1,
                   "key_id": b})["stale"] is True
    _ok(s, {"op": "raft_rotate_ack", "node_id": "m1", "stage": 1, "key_id": a})
    assert s.cluster.raft_acks == {"m1": 1}
    # while nobody sends with it, a new rotation may replace it
    _ok(s, {"op": "raft_rotate_start", "key_id": b})
    assert (s.cluster.raft_next_key_id, s.cluster.raft_acks) == (b, {})
    _ok(s, {"op": "raft_rotate_phase", "phase": "switch", "key_id": b})
    out = s.apply({"op": "raft_rotate_start", "key_id": a})
    assert out["error"]["field"] == "raft_phase"  # switching: no new rotation
    out = s.apply({"op": "raft_rotate_finish", "key_id": a})
    assert out["error"]["field"] == "key_id"
    _ok(s, {"op": "raft_rotate_finish", "key_id": b})
    assert (s.cluster.raft_key_id, s.cluster.raft_phase, s.cluster.raft_next_key_id) == \
        (b, "", "")
    for bad, field in (({"key_id": "xyz"}, "key_id"), ({"key_id": b}, "key_id")):
        out = s.apply({"op": "raft_rotate_start", **bad})
        assert out["error"]["field"] == field, out
    assert _ok(s, {"op": "raft_rotate_ack", "node_id": "m1", "stage": 1,
                   "key_id": b})["stale"] is True


def test_a_rotation_needs_schema_2() -> None:
    s = _state()
    s.cluster = replace(s.cluster, schema=1)  # some node may still run shoal 0.1
    with pytest.raises(Rejected):
        raft_rotate_start(s, {"key_id": secret_id("a")})
