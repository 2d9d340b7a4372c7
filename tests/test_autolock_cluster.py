"""Manager key safety end to end on netns hosts, through the real CLI: autolock (a restarted
manager stays locked and out of Raft until `shoal unlock`), unlock-key rotation, and a CA
rotation during which every manager restarts, with a service running throughout.

One lab (3 managers, 2 workers) for the whole story: forming it is the expensive part.
"""

from __future__ import annotations

import functools
import json
import shlex
import signal
from collections.abc import Callable
from typing import Any

import pytest

from netlab import FAULT_CHAIN, REPO, Host, Lab, wait_until
from shoal.node import pki, sealing

pytestmark = pytest.mark.netns

PROBE = str(REPO / "tests" / "security_probe.py")
# a planned restart of a locked manager lasts until `unlock`: on a loaded machine longer than
# the default 30 s, after which its tasks would be replaced
GRACE = ("--restart-grace", "180")


def info(h: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(h.cli("info").stdout)
    return out


def node_json(h: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((h.data_dir / "node.json").read_text())
    return out


def err(h: Host, *args: str, stdin: str = "") -> str:
    """A CLI command that must fail with one clear line (``stdin``: piped in)."""
    cmd = " ".join(shlex.quote(a) for a in [*h.shoal_argv, "-H", f"unix://{h.sock}", *args])
    if stdin:
        cmd = f"printf '%s\\n' {shlex.quote(stdin)} | {cmd}"
    res = h.run("sh", "-c", cmd, check=False, timeout=60)
    assert res.returncode != 0, (args, res.stdout)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), res.stderr
    return lines[-1]


def unlock(h: Host, key: str) -> None:
    cmd = " ".join(shlex.quote(a) for a in [*h.shoal_argv, "-H", f"unix://{h.sock}", "unlock"])
    h.run("sh", "-c", f"printf '%s\\n' {shlex.quote(key)} | {cmd}", timeout=60)


def opens(h: Host, key: str) -> bool:
    """Whether ``key`` opens the keys wrapped in ``h``'s node.json (read from disk)."""
    try:
        sealing.unwrap_keys(key, node_json(h)["node_id"], node_json(h)["key_wrap"])
    except (sealing.SealError, KeyError):
        return False
    return True


def locked_at_rest(h: Host) -> bool:
    """node.json holds no Raft secret or managers' key in the clear; the TLS key is
    encrypted."""
    d = node_json(h)
    return bool(d.get("key_wrap")) and d["raft_password"] == "" and d["manager_key"] == "" \
        and b"ENCRYPTED PRIVATE KEY" in (h.data_dir / "tls" / "node.pem").read_bytes()


def raft_port_open(src: Host, dst: Host) -> bool:
    res = src.run("python3", "-c", "import socket,sys; s=socket.socket(); s.settimeout(2); "
                  f"sys.exit(s.connect_ex(('{dst.ip}', 2378)))", check=False)
    return res.returncode == 0


def ready(h1: Host, n: int) -> bool:
    nodes = h1.cli_json("node", "ls")
    return len(nodes) == n and all(x["state"] == "ready" for x in nodes)


def restart_locked(h: Host, key: str, wrong: str, other: Host) -> None:
    """Planned restart (SIGTERM: its tasks keep running): the manager comes back locked and
    out of Raft, refuses a wrong and a malformed key, rejoins with the right one and catches
    up with a write made meanwhile through ``other``."""
    h.kill_agent(signal.SIGTERM)
    h.start_agent(*GRACE)
    i = info(h)
    assert i["locked"] is True and i["member"] is False
    assert "locked" in err(h, "service", "ls")
    assert locked_at_rest(h)
    assert not raft_port_open(other, h), "a locked manager must not run Raft"
    other.cli("secret", "create", f"while-{h.name}-locked", "/etc/hostname")
    assert "does not open" in err(h, "unlock", stdin=wrong)
    assert "malformed unlock key" in err(h, "unlock", stdin="SWMKEY-1-nope")
    assert info(h)["locked"] is True
    unlock(h, key)
    wait_until(lambda: info(h).get("ready") and raft_port_open(other, h), timeout=60,
               what=f"{h.name} unlocked and back in Raft")
    assert f"while-{h.name}-locked" in h.cli("secret", "ls").stdout  # caught up
    assert "not locked" in err(h, "unlock", stdin=key)


def tasks(h1: Host, service: str) -> dict[str, str]:
    return {t["id"]: t["state"] for t in h1.cli_json("service", "ps", service)
            if t["desired_state"] == "running"}


def test_autolock_unlock_key_rotation_and_ca_rotation_with_every_manager_restarting(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(5)
    h1, h2, h3, h4, h5 = lab.hosts
    for h in lab.hosts:
        h.start_agent(*GRACE)
    out = h1.cli("init", "--autolock").stdout
    key1 = next(w for w in out.split() if w.startswith("SHOALKEY-1-"))
    tokens = {r: h1.cli("join-token", r, "-q").stdout.strip() for r in ("manager", "worker")}
    def join(h: Host, role: str) -> bool:
        return h.cli("join", "--token", tokens[role], f"{h1.ip}:2377", check=False,
                     timeout=60).returncode == 0

    for h, role in ((h2, "manager"), (h3, "manager"), (h4, "worker"), (h5, "worker")):
        # (the first contact right after init may time out while h1 sets up its network)
        wait_until(functools.partial(join, h, role), timeout=90, interval=1.0,
                   what=f"{h.name} joined")
    wait_until(lambda: ready(h1, 5), timeout=60, what="5 nodes ready")
    assert h1.cli("unlock-key", "-q").stdout.strip() == key1

    # every manager's keys are wrapped at rest under the unlock key; workers keep none
    wait_until(lambda: all(locked_at_rest(h) and opens(h, key1) for h in (h1, h2, h3)),
               timeout=30, what="managers' keys wrapped at rest")
    assert not node_json(h4).get("key_wrap")

    # rotating the unlock key: every running manager re-wraps; the old key stops working
    key2 = h1.cli("unlock-key", "--rotate", "-q").stdout.strip()
    assert key2.startswith("SHOALKEY-1-") and key2 != key1
    wait_until(lambda: all(opens(h, key2) and not opens(h, key1) for h in (h1, h2, h3)),
               timeout=30, what="every manager re-wrapped under the new unlock key")
    assert h3.cli("unlock-key", "-q").stdout.strip() == key2

    # a removed node gets nothing under the new root
    h1.cli("node", "rm", "--force", "h5")
    h1.cli("service", "create", "--name", "calm", "--replicas", "4", "--", "sleep", "100000")
    wait_until(lambda: (t := tasks(h1, "calm")) and len(t) == 4 and
               all(s == "running" for s in t.values()), timeout=90, what="calm running")
    before = tasks(h1, "calm")
    # CA rotation while the service runs, every manager restarting during it. Worker h4
    # cannot reach the managers' API meanwhile (gossip still says it is alive, so its node
    # stays ready and the rotation waits for it in its first phase)
    old_digest = json.loads(h1.cli("ca", "info").stdout)["digest"]
    h4._fault_chain()
    h4._iptables("-A", FAULT_CHAIN, "-p", "tcp", "--sport", "2377", "-j", "DROP")
    h1.cli("ca", "rotate", "-d")
    rot = json.loads(h1.cli("ca", "info").stdout)["rotation"]
    new_digest = rot["next_digest"]
    assert rot["phase"] == "trust" and new_digest != old_digest
    for h, other in ((h1, h2), (h2, h3), (h3, h1)):  # the old unlock key is refused
        restart_locked(h, key2, wrong=key1, other=other)
        rot = json.loads(h.cli("ca", "info").stdout)["rotation"]
        assert (rot["phase"], rot["next_digest"]) == ("trust", new_digest), rot
    h4.heal()
    wait_until(lambda: json.loads(h1.cli("ca", "info").stdout)["digest"] == new_digest,
               timeout=90, what="the CA rotation to finish")
    for h in (h1, h2, h3, h4):
        def on_new_root(h: Host = h) -> bool:
            ca = (h.data_dir / "tls" / "ca.pem").read_bytes()
            return len(pki.load_certs(ca)) == 1 and pki.ca_digest(ca) == new_digest
        wait_until(on_new_root, timeout=30, what=f"{h.name} trusting only the new root")
        pki.verify_issued_by((h.data_dir / "tls" / "node.pem").read_bytes(),
                             (h.data_dir / "tls" / "ca.pem").read_bytes())
    assert all(locked_at_rest(h) for h in (h1, h2, h3)), "re-issued keys stay encrypted"
    # the service was never touched, the cluster is writable, joining pins the new root
    assert tasks(h1, "calm") == before
    h1.cli("service", "scale", "calm=5")
    wait_until(lambda: len(tasks(h1, "calm")) == 5, timeout=60, what="scaled to 5")
    assert new_digest in h1.cli("join-token", "worker", "-q").stdout
    # new managers' keys while h3 is down: everything re-sealed under a new managers' key
    # (the others fetch it over mTLS), and a new Raft secret: h1 and h2 accept it, send with
    # it, drop the old one, and the cluster stays writable. h3 comes back on the old secret,
    # cannot open its peers' messages, and fetches the new one over mTLS (still a manager)
    def wrapped(h: Host) -> dict[str, str]:
        return sealing.unwrap_keys(key2, node_json(h)["node_id"], node_json(h)["key_wrap"])

    def managers_key(h: Host) -> str:
        return wrapped(h)["manager_key"]
    old_mk, old_raft = managers_key(h1), wrapped(h1)["raft_password"]
    h3.kill_agent(signal.SIGKILL)  # (a planned restart would keep it "ready" for the grace)
    wait_until(lambda: any(n["hostname"] == "h3" and n["state"] == "down"
                           for n in h1.cli_json("node", "ls")), timeout=60, what="h3 down")
    out = h1.cli("swarm", "rotate-key", timeout=180).stdout
    assert "re-sealed" in out and "Rotated the Raft secret" in out, out
    new_raft = {wrapped(h)["raft_password"] for h in (h1, h2)}
    assert len(new_raft) == 1 and old_raft not in new_raft, "h1, h2: one new Raft secret"
    wait_until(lambda: all(not wrapped(h).get("raft_extra") for h in (h1, h2)), timeout=30,
               what="h1, h2 dropping the old Raft secret")
    h2.cli("secret", "create", "after-raft-rotation", "/etc/hostname")
    h3.start_agent(*GRACE)
    unlock(h3, key2)
    wait_until(lambda: "after-raft-rotation" in h3.cli("secret", "ls").stdout, timeout=90,
               what="h3 back in Raft on the new secret")
    wait_until(lambda: wrapped(h3)["raft_password"] in new_raft and not wrapped(h3).get(
        "raft_extra"), timeout=30, what="h3 holding only the new Raft secret")
    wait_until(lambda: len({managers_key(h) for h in (h1, h2, h3)} - {old_mk}) == 1 and
               old_mk not in {managers_key(h) for h in (h1, h2, h3)}, timeout=60,
               what="every manager on the new managers' key (wrapped at rest)")
    for h in (h2, h3):  # each opens the re-sealed unlock key with its new managers' key
        assert h.cli("unlock-key", "-q").stdout.strip() == key2
    h2.cli("secret", "create", "after-rotation", "/etc/hostname")
    # the removed node's certificate is refused, so it cannot renew under the new root
    res = json.loads(h5.run(
        "python3", PROBE, f"https://{h1.ip}:2377/v1/cluster/renew", "--body",
        json.dumps({"csr": pki.make_csr(pki.new_key()).decode()}),
        "--cert", str(h5.data_dir / "tls" / "node.pem")).stdout)
    assert "error" in res or res.get("status") in (401, 403), res
