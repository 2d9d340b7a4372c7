"""What only an admin may ask for (shoal.node.hostaccess, users.require_admin): a service spec
reaching beyond its task's sandbox, a volume the node mounts, the registry credentials, a
node's role, exec --privileged; and the dashboard's login limit under concurrent guesses.
Each test names the property; tests/test_dashboard_cluster.py checks it through the remote
API of a running cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.node.errors import Forbidden
from shoal.node.hostaccess import host_access, secret_access, volume_access
from shoal.node.users import (
    REQUEST_ROLE,
    REQUEST_USER,
    ROOT,
    LoginLimiter,
    LoginLimits,
    require_admin,
)
from shoal.raft.validate import validate_spec


def _spec(**task: Any) -> Any:
    container = task.pop("container", {})
    return validate_spec({"name": "s", "task": {"container": {"command": ["sleep", "9"],
                                                              **container}, **task}})


@pytest.mark.parametrize(("task", "field", "words"), [
    ({"container": {"mounts": [{"type": "bind", "source": "/", "target": "/host"}]}},
     "task.container.mounts[0]", "bind mount of the node's /"),
    ({"container": {"mounts": [{"type": "tmpfs", "target": "/t"}, {
        "type": "volume", "source": "disk", "target": "/d", "volume_opts": {
            "type": "ext4", "device": "/dev/sda1"}}]}},
     "task.container.mounts[1]", "a local volume the node mounts"),
    ({"network_mode": "host"}, "task.network_mode", "the node's own network"),
    ({"container": {"cap_add": ["SYS_ADMIN"]}}, "task.container.cap_add", "SYS_ADMIN"),
    ({"container": {"cap_add": ["ALL"]}}, "task.container.cap_add", "ALL"),
    ({"container": {"oom_score_adj": -500}}, "task.container.oom_score_adj", "negative"),
    ({"container": {"secrets": [{"name": "db"}, {"name": "registry-auth.reg-5000"}]}},
     "task.container.secrets[1]", "registry credentials"),
])
def test_a_spec_reaching_beyond_its_sandbox_is_named_by_its_field(
        task: dict[str, Any], field: str, words: str) -> None:
    access = host_access(_spec(**task))
    assert access is not None and access[0] == field and words in access[1], access


def test_an_applications_spec_needs_no_admin() -> None:
    """Named volumes, tmpfs, Docker's default capabilities, a positive OOM score, an
    ordinary secret, published ports: an operator's."""
    spec = _spec(container={"mounts": [{"type": "volume", "source": "data", "target": "/d"},
                                       {"type": "tmpfs", "target": "/t"}],
                            "cap_add": ["NET_BIND_SERVICE", "chown"], "oom_score_adj": 500,
                            "secrets": [{"name": "db"}]})
    assert host_access(spec) is None
    assert volume_access("local", {}) == "" and volume_access("sshfs", {"sshcmd": "u@h:/"}) == ""
    assert volume_access("local", {"Type": "nfs", "o": "addr=10.0.0.1"})
    assert secret_access("registry-auth.reg-5000") and not secret_access("db")


def test_require_admin_refuses_an_operator_naming_the_field_and_lets_admins_and_root() -> None:
    async def as_user(user: str | None, role: str) -> None:
        REQUEST_USER.set(user)
        REQUEST_ROLE.set(role)
        require_admin("a bind mount", "task.container.mounts[0]")

    with pytest.raises(Forbidden) as exc:
        asyncio.run(as_user("bob", "operator"))
    assert exc.value.field == "task.container.mounts[0]"
    assert "a bind mount needs the admin role; user 'bob' is a operator" in exc.value.message
    asyncio.run(as_user("alice", "admin"))
    asyncio.run(as_user(ROOT, "viewer"))  # (the unix socket: root on the node)
    asyncio.run(as_user(None, "viewer"))  # (an unguarded listener)


def test_concurrent_logins_are_counted_before_their_check_ends() -> None:
    """Five guesses in flight together use the whole allowance (before: all 200 of a burst
    passed the check, each starting a 32 MiB scrypt); a right password gives its attempt
    back."""
    lim = LoginLimiter(LoginLimits(failures=5, window=60.0))
    for i in range(5):
        lim.attempt("10.0.0.1", "admin", now=100.0 + i / 10)
    from shoal.node.errors import TooManyRequests
    with pytest.raises(TooManyRequests):
        lim.attempt("10.0.0.1", "admin", now=100.6)
    lim2 = LoginLimiter(LoginLimits(failures=2, window=60.0))
    for _ in range(5):  # (the right password, again and again: never limited)
        lim2.succeeded("10.0.0.2", "bob", lim2.attempt("10.0.0.2", "bob", now=200.0))


def test_a_joining_node_says_what_it_is_not_its_labels_availability_or_state() -> None:
    """Node labels are the managers' (Swarm's rule: placement on them is a trust boundary,
    the tasks' secrets go where they match): a join's own labels, availability and state
    are dropped (before: a worker-token holder set zone=pci and drew those tasks). Its
    generic resources stay: Swarm's nodes report theirs too."""
    from types import SimpleNamespace

    from shoal.node import pki, upgrade
    from shoal.node.control.admission import Admission
    from shoal.raft.state import ClusterState

    w, m = "a" * 32, "b" * 32
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                             "digest": "0" * 64, "worker_secret": w, "manager_secret": m})
    st.apply({"op": "cluster_schema", "schema": upgrade.SCHEMA})

    class Store:
        def snapshot(self) -> Any:
            return st.snapshot()

    async def propose(cmd: dict[str, Any]) -> Any:
        return st.apply(cmd)

    ctx = SimpleNamespace(require_manager=lambda: Store(), propose=propose)
    sec = SimpleNamespace(token_secrets=lambda _snap: (w, m), issue=lambda *_a, **_k: b"CERT")
    adm = Admission(ctx, sec, None, None)  # type: ignore[arg-type]
    node = {"hostname": "evil", "addr": "10.0.0.66", "api_port": 2377, "raft_port": 2378,
            "labels": {"zone": "pci"}, "availability": "active", "state": "ready",
            "generic_resources": {"gpu": 8}}
    out = asyncio.run(adm.accept_join("SHOAL-1-" + "0" * 64 + "-" + w, node,
                                      pki.make_csr(pki.new_key()).decode(), upgrade.SCHEMA))
    rec = st.snapshot().nodes[out["node_id"]]
    assert rec.labels == {} and rec.hostname == "evil"
    assert rec.generic_resources == {"gpu": 8}
