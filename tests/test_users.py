"""Users and roles without a network: password hashing, the role table, the replicated
``user_*`` commands, the login limiter. (The same on real agents, through a browser and the
remote API: tests/test_dashboard_cluster.py.)"""

from __future__ import annotations

import pytest

from shoal.node import openapi
from shoal.node.errors import TooManyRequests
from shoal.node.users import (
    ADMIN_OPS,
    LoginLimiter,
    LoginLimits,
    hash_password,
    rank,
    required_role,
    verify_password,
)
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_from_bytes, state_to_bytes

FAST = {"n": 1 << 10, "r": 8, "p": 1}  # cheap parameters for the tests only


def test_a_password_hash_records_its_parameters_and_salt_and_checks_only_that_password(
) -> None:
    a, b = hash_password("hunter22-long", **FAST), hash_password("hunter22-long", **FAST)
    kind, n, r, p, salt, _digest = a.split("$")
    assert (kind, n, r, p) == ("scrypt", "1024", "8", "1")
    assert a != b and salt != b.split("$")[4]  # a new salt every time
    assert verify_password("hunter22-long", a) and verify_password("hunter22-long", b)
    assert not verify_password("hunter22-lonG", a)
    assert "hunter22" not in a


@pytest.mark.parametrize("bad", ["", "scrypt$1$8$1$AA==$AA==", "md5$1024$8$1$AA==$AA==",
                                 "scrypt$x$8$1$AA==$AA==", "scrypt$1024$8$1$!!$AA==",
                                 f"scrypt${1 << 30}$8$1$AA==$AA=="])
def test_a_malformed_or_overly_costly_hash_never_verifies_and_never_raises(bad: str) -> None:
    assert verify_password("anything-at-all", bad) is False


def test_viewers_read_operators_change_and_admins_hold_the_keys() -> None:
    ops = {r.op: r for r in openapi.routes("local")}
    assert not ADMIN_OPS - ops.keys(), ADMIN_OPS - ops.keys()
    assert required_role("service_ls") == "viewer"
    assert required_role("events") == "viewer"
    assert required_role("service_scale") == "operator"
    assert required_role("node_update") == "operator"  # drain / activate
    assert required_role("secret_create") == "operator"
    # a secret's value is never readable, so reading secrets' metadata is a viewer's
    assert required_role("secret_inspect") == "viewer"
    for op in ("swarm_join_token", "user_add", "user_ls", "ca_issue_client", "node_promote",
               "image_build", "builder_prune"):
        assert required_role(op) == "admin", op
    for op, route in ops.items():  # every change needs more than a viewer
        if route.method != "GET":
            assert rank(required_role(op)) > rank("viewer"), op


def _apply(state: ClusterState, cmd: dict[str, object]) -> dict[str, object]:
    return state.apply({"now": 1.0, **cmd})


def test_users_are_replicated_commands_and_removing_one_revokes_its_certificates() -> None:
    s = ClusterState()
    assert _apply(s, {"op": "user_add", "name": "bob", "role": "viewer",
                      "password": "sealed:x"}).get("ok")
    again = _apply(s, {"op": "user_add", "name": "bob", "role": "admin", "password": "y"})
    assert again["error"]["code"] == "exists"  # type: ignore[index]
    bad = _apply(s, {"op": "user_add", "name": "eve", "role": "root", "password": "y"})
    assert bad["error"]["field"] == "role"  # type: ignore[index]
    assert _apply(s, {"op": "user_update", "name": "bob", "role": "operator",
                      "token_hash": "ab" * 32}).get("ok")
    assert s.cluster.users["bob"].role == "operator"
    assert s.cluster.users["bob"].password == "sealed:x"  # untouched
    unknown = _apply(s, {"op": "client_cert_add", "name": "c1", "serial": "ab", "user": "zed"})
    assert unknown["error"]["code"] == "not_found"  # type: ignore[index]
    assert "c1" not in s.cluster.clients
    assert _apply(s, {"op": "client_cert_add", "name": "c1", "serial": "ab",
                      "user": "bob"}).get("ok")
    assert _apply(s, {"op": "client_cert_add", "name": "c2", "serial": "cd"}).get("ok")
    assert s.cluster.client_users == {"c1": "bob"}
    # the state travels to workers and snapshots with its users
    copy = state_from_bytes(state_to_bytes(s))
    assert copy.cluster.users == s.cluster.users
    assert copy.cluster.client_users == {"c1": "bob"}
    assert _apply(s, {"op": "user_remove", "name": "bob"}).get("ok")
    assert s.cluster.users == {} and s.cluster.client_users == {}
    assert s.cluster.clients == {"c2": "cd"}  # bob's certificate revoked, the other kept
    assert _apply(s, {"op": "user_remove", "name": "bob"})["error"]["code"] == "not_found"  # type: ignore[index]


def test_failed_logins_are_limited_per_client_and_per_user_then_age_out() -> None:
    lim = LoginLimiter(LoginLimits(failures=3, window=60.0))
    for i in range(3):
        lim.check("10.0.0.1", "bob", now=100.0 + i)
        lim.failed("10.0.0.1", "bob", now=100.0 + i)
    with pytest.raises(TooManyRequests) as exc:
        lim.check("10.0.0.1", "alice", now=103.0)  # the same client, another user
    assert exc.value.retry_after >= 1
    with pytest.raises(TooManyRequests):
        lim.check("10.0.0.2", "bob", now=103.0)  # another client, the same user
    lim.check("10.0.0.2", "alice", now=103.0)  # neither: fine
    lim.check("10.0.0.1", "bob", now=161.0)  # the oldest failure aged out
