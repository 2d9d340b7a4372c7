"""Cluster security end to end: real agents on netns hosts, probed as outsiders would.

Each test names the user-visible property it checks. The probe (tests/security_probe.py)
is a separate process in a lab host speaking HTTPS with whatever certificate it is given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import REPO, Host, Lab, wait_until
from shoal.node import pki

pytestmark = pytest.mark.netns

PROBE = str(REPO / "tests" / "security_probe.py")


def probe(src: Host, dst: Host, path: str, body: dict[str, Any] | None = None,
          cert: Path | None = None, ca: Path | None = None, hostname: str = "",
          method: str = "POST", plain: bool = False, port: int = 2377) -> dict[str, Any]:
    """Call ``dst``'s node API from a process in ``src``; {"status", "body"} or {"error"}."""
    scheme = "http" if plain else "https"
    argv = [sys.executable, PROBE, f"{scheme}://{dst.ip}:{port}{path}", "--method", method,
            "--body", json.dumps(body or {})]
    if cert:
        argv += ["--cert", str(cert)]
    if ca:
        argv += ["--ca", str(ca)]
    if hostname:
        argv += ["--hostname", hostname]
    if plain:
        argv.append("--plain")
    out: dict[str, Any] = json.loads(src.run(*argv).stdout)
    return out


def node_pem(h: Host) -> Path:
    return h.data_dir / "tls" / "node.pem"


def ca_pem(h: Host) -> Path:
    return h.data_dir / "tls" / "ca.pem"


def err(host: Host, *args: str) -> str:
    """Run a CLI command that must fail with one clear line; return that line."""
    res = host.cli(*args, check=False, timeout=60)
    assert res.returncode != 0, (args, res.stdout)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), res.stderr
    return lines[-1]


def info(host: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(host.cli("info").stdout)
    return out


def test_join_refused_for_wrong_rotated_or_foreign_token_and_nothing_written(
        lab_factory: Callable[..., Lab]) -> None:
    """A wrong secret, a rotated token, or a token whose CA digest is not the manager's (a
    token of another cluster, or a manager of another cluster) is refused with one clear
    line; the cluster's state does not change and the refused node keeps no key or cert."""
    lab = lab_factory(3)
    h1, h2, h3 = lab.hosts
    lab.start_agents(lab.hosts)
    h1.cli("init")
    h3.cli("init")  # a second, unrelated cluster
    old = h1.cli("join-token", "worker", "-q").stdout.strip()
    h1.cli("join-token", "worker", "--rotate")
    good = h1.cli("join-token", "worker", "-q").stdout.strip()
    foreign = h3.cli("join-token", "worker", "-q").stdout.strip()
    wrong = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    # (stale reads: a default read commits a read barrier, which would move the index)
    before = info(h1)["index"], h1.cli_json("--stale", "node", "ls")

    assert "invalid join token" in err(h2, "join", "--token", wrong, f"{h1.ip}:2377")
    assert "invalid join token" in err(h2, "join", "--token", old, f"{h1.ip}:2377")
    # the other cluster's token pins the other CA: h1 is not trusted, nothing is sent to it
    assert "does not match the join token's CA digest" in err(
        h2, "join", "--token", foreign, f"{h1.ip}:2377")
    # h1's digest with the other cluster's secret: h1 passes the pin, refuses the secret
    mixed = good.rsplit("-", 1)[0] + "-" + foreign.rsplit("-", 1)[1]
    assert "invalid join token" in err(h2, "join", "--token", mixed, f"{h1.ip}:2377")
    # a good token sent to a manager of another cluster: refused by the joining node itself
    assert "another cluster" in err(h2, "join", "--token", good, f"{h3.ip}:2377")

    assert (info(h1)["index"], h1.cli_json("--stale", "node", "ls")) == before
    assert info(h2)["member"] is False
    assert not (h2.data_dir / "node.json").exists()
    assert not node_pem(h2).exists()
    h2.cli("join", "--token", good, f"{h1.ip}:2377")
    assert info(h2)["role"] == "worker"


def test_node_api_needs_a_member_certificate_and_managers_ops_a_manager_one(
        lab_factory: Callable[..., Lab]) -> None:
    """Without a certificate of the cluster a process gets nothing but the public CA and a
    refused join; with a worker's certificate it cannot get the managers' key nor speak for
    another node; a manager's own certificate gets the key."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    ids = {n["hostname"]: n["id"] for n in h1.cli_json("node", "ls")}

    # plain HTTP: no TLS, no answer
    assert "error" in probe(h3, h1, "/v1/cluster/heartbeat", {"node_id": ids["h3"]},
                            plain=True)
    # TLS without a client certificate
    for path in ("/v1/cluster/heartbeat", "/v1/cluster/keys", "/v1/cluster/manager-keys",
                 "/v1/cluster/renew"):
        r = probe(h3, h1, path, {"node_id": ids["h3"], "csr": "x"})
        assert r["status"] == 401 and r["body"]["error"]["code"] == "unauthenticated", (path, r)
    r = probe(h3, h1, "/v1/cluster/ca", method="GET")
    assert r["status"] == 200 and pki.ca_digest(r["body"]["ca_cert"]) == pki.ca_digest(
        ca_pem(h1).read_bytes())
    r = probe(h3, h1, "/v1/cluster/join", {"token": "SHOAL-1-" + "0" * 64 + "-" + "0" * 32,
                                           "csr": "x", "node": {}})
    assert r["status"] == 403 and "invalid join token" in r["body"]["error"]["message"]

    # a certificate from another CA with a manager's name: the handshake fails
    other_ca = pki.CertificateAuthority(*pki.create_ca("evil", time.time()))
    key = pki.new_key()
    forged = pki.TlsFiles(h3.data_dir / "forged")
    forged.save(other_ca.cert_pem, other_ca.issue(
        pki.make_csr(key), ids["h1"], "manager", info(h1)["cluster_id"],
        time.time(), 3600), pki.key_pem(key))
    assert "error" in probe(h3, h1, "/v1/cluster/manager-keys", cert=forged.cert)

    # a worker's certificate: a member, but not a manager
    r = probe(h3, h1, "/v1/cluster/keys", cert=node_pem(h3), ca=ca_pem(h3),
              hostname="manager.shoal")
    assert r["status"] == 200 and r["body"]["raft_password"] == ""  # managers only
    r = probe(h3, h1, "/v1/cluster/manager-keys", cert=node_pem(h3))
    assert r["status"] == 403 and r["body"]["error"]["code"] == "forbidden"
    assert "manager_key" not in json.dumps(r)
    r = probe(h3, h1, "/v1/cluster/heartbeat", {"node_id": ids["h2"]}, cert=node_pem(h3))
    assert r["status"] == 403  # cannot speak for another node
    # the workers hold no manager key on disk either
    for w in (h2, h3):
        assert json.loads((w.data_dir / "node.json").read_text())["manager_key"] == ""
    # every node got the same 32-byte gossip key (over mTLS, in the keys reply); it never
    # travels through Raft
    gossip = {json.loads((h.data_dir / "node.json").read_text())["gossip_key"]
              for h in lab.hosts}
    assert len(gossip) == 1 and len(bytes.fromhex(gossip.pop())) == 32
    key = bytes.fromhex(json.loads((h1.data_dir / "node.json").read_text())["gossip_key"])
    for p in (h1.data_dir / "raft").iterdir():
        assert key not in p.read_bytes() and key.hex().encode() not in p.read_bytes()
    # a worker is not a manager to TLS: a client verifying the role refuses it
    r = probe(h1, h2, "/v1/cluster/ca", method="GET", ca=ca_pem(h1),
              hostname="manager.shoal")
    assert "error" in r and "manager.shoal" in r["error"]
    # the manager's own certificate gets the managers' key
    r = probe(h1, h1, "/v1/cluster/manager-keys", cert=node_pem(h1))
    assert r["status"] == 200 and len(r["body"]["manager_key"]) == 64


def test_workers_hold_no_raft_secret_and_write_only_their_own_reports(
        lab_factory: Callable[..., Lab]) -> None:
    """Workers follow the cluster state over mTLS (node/feed.py), not Raft: no Raft secret on
    their disk, yet they run tasks; the worker channel needs a member certificate and takes
    only status reports for the caller's own tasks and its own removal."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    ids = {n["hostname"]: n["id"] for n in h1.cli_json("node", "ls")}
    secret = json.loads((h1.data_dir / "node.json").read_text())["raft_password"]
    assert len(secret) >= 32
    for w in (h2, h3):
        ident = json.loads((w.data_dir / "node.json").read_text())
        assert ident["raft_password"] == "" and ident["managers"] == [f"{h1.ip}:2377"]
        for p in w.data_dir.rglob("*"):
            if p.is_file() and p.stat().st_size < 50 << 20:
                assert secret.encode() not in p.read_bytes(), p
        assert info(w)["ready"] and info(w)["index"] > 0

    # the workers still learn of their tasks and report them RUNNING
    h1.cli("node", "update", "--availability", "drain", ids["h1"])
    h1.cli("service", "create", "--name", "fed", "--replicas", "2", "--", "sleep", "1000")
    deadline = time.monotonic() + 60
    while True:
        tasks = h1.cli_json("service", "ps", "fed")
        if sum(t["state"] == "running" for t in tasks) == 2:
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(0.2)
    assert {t["node_id"] for t in tasks} == {ids["h2"], ids["h3"]}
    theirs = next(t for t in tasks if t["node_id"] == ids["h2"])

    def report(cmd: dict[str, Any], cert: Path | None) -> dict[str, Any]:
        return probe(h3, h1, "/v1/cluster/report", {"cmd": cmd}, cert=cert)

    status = {"state": "failed", "timestamp": time.time(), "message": "forged", "err": "x"}
    # no certificate: nothing
    r = report({"op": "task_status", "task_id": theirs["id"], "node_id": ids["h3"],
                "now": time.time(), "status": status}, None)
    assert r["status"] == 401
    r = probe(h3, h1, "/v1/cluster/state", {"after": -1})
    assert r["status"] == 401
    # a worker's certificate cannot speak for another node, nor write anything else
    r = report({"op": "task_status", "task_id": theirs["id"], "node_id": ids["h2"],
                "now": time.time(), "status": status}, node_pem(h3))
    assert r["status"] == 403 and r["body"]["error"]["field"] == "node_id", r
    r = report({"op": "node_remove", "id": ids["h2"], "now": time.time()}, node_pem(h3))
    assert r["status"] == 403 and r["body"]["error"]["field"] == "id", r
    r = report({"op": "service_create", "id": "evil", "now": time.time(),
                "spec": {"name": "evil", "command": ["true"]}}, node_pem(h3))
    assert r["status"] == 403 and r["body"]["error"]["field"] == "op", r
    # its own name on another node's task: the state machine refuses it, nothing changes
    r = report({"op": "task_status", "task_id": theirs["id"], "node_id": ids["h3"],
                "now": time.time(), "status": status}, node_pem(h3))
    assert r["status"] == 200 and "error" in r["body"]["result"], r
    assert "evil" not in h1.cli("service", "ls").stdout
    after = {t["id"]: t["state"] for t in h1.cli_json("service", "ps", "fed")}
    assert after[theirs["id"]] == "running"


def test_removed_node_is_cut_off_and_cannot_rejoin_without_a_token(
        lab_factory: Callable[..., Lab]) -> None:
    """`node rm` revokes: the removed agent's certificate is refused on every route (its
    heartbeats, a renewal, the keys), and it comes back only with a current token — its old
    certificate and a rotated token do not work — as a new node."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    old_token = h1.cli("join-token", "worker", "-q").stdout.strip()
    old_id = info(h3)["node_id"]
    assert probe(h3, h1, "/v1/cluster/keys", cert=node_pem(h3))["status"] == 200

    h1.cli("node", "rm", "--force", "h3")
    for path in ("/v1/cluster/keys", "/v1/cluster/renew", "/v1/cluster/heartbeat"):
        r = probe(h3, h1, path, {"node_id": old_id, "csr": "x"}, cert=node_pem(h3))
        assert r["status"] == 401 and "not a member" in r["body"]["error"]["message"], r
    wait_until(lambda: "refuses this node" in h3.log_tail(200), timeout=20,
               what="h3's agent sees its heartbeats refused")
    # and says so (it went on saying member, ready: a user had no way to tell)
    wait_until(lambda: "removed from the cluster" in info(h3).get("removed", ""), timeout=30,
               what="h3's info says it was removed")
    assert old_id not in {n["id"] for n in h1.cli_json("node", "ls")}
    # its state feed is cut off too (workers have no Raft connection): writes no longer
    # reach it
    r = probe(h3, h1, "/v1/cluster/state", {"after": -1}, cert=node_pem(h3))
    assert r["status"] == 401 and "not a member" in r["body"]["error"]["message"], r
    wait_until(lambda: "state feed from" in h3.log_tail(200) and "interrupted" in
               h3.log_tail(200), timeout=30, what="h3's state feed refused")
    frozen = info(h3)["index"]
    h1.cli("service", "create", "--name", "after", "--replicas", "0", "--", "sleep", "1")
    wait_until(lambda: info(h2)["index"] > frozen, timeout=10, what="h2 sees the write")
    time.sleep(1.5)
    assert info(h3)["index"] == frozen

    h1.cli("join-token", "worker", "--rotate")
    h3.cli("leave")
    assert "invalid join token" in err(h3, "join", "--token", old_token, f"{h1.ip}:2377")
    new_token = h1.cli("join-token", "worker", "-q").stdout.strip()
    h3.cli("join", "--token", new_token, f"{h1.ip}:2377")
    new_id = info(h3)["node_id"]
    assert new_id != old_id
    wait_until(lambda: {n["id"]: n["state"] for n in h1.cli_json("node", "ls")}.get(new_id)
               == "ready", timeout=20, what="h3 back as a new, ready node")


def test_certificates_renew_before_expiry_without_disrupting_tasks(
        lab_factory: Callable[..., Lab]) -> None:
    """With 20 s certificates renewed halfway, every node gets fresh certificates for new
    keys over mTLS (no token) well before expiry, stays ready, and its tasks keep running
    (same pids); an expired certificate is refused."""
    lab = lab_factory(3)
    for h in lab.hosts:
        h.start_agent("--cert-lifetime", "20", "--cert-renew-fraction", "0.5")
    lab.form_cluster(managers=2, workers=1)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "calm", "--replicas", "3", "--", "sleep", "100000")

    def running() -> dict[str, int] | None:
        tasks = h1.cli_json("service", "ps", "calm")
        pids = {t["id"]: t["pid"] for t in tasks if t["state"] == "running"}
        return pids if len(pids) == 3 else None
    pids = wait_until(running, timeout=30, what="3 running tasks")
    first = {h.name: pki.cert_info(pki.TlsFiles(h.data_dir / "tls").cert_pem())
             for h in lab.hosts}
    old_copy = lab.hosts[2].data_dir / "old.pem"
    old_copy.write_bytes(node_pem(lab.hosts[2]).read_bytes())
    seen: dict[str, set[int]] = {h.name: {first[h.name].serial} for h in lab.hosts}
    # Watched until every node has renewed twice and the kept copy has expired (a fixed
    # 32 s, > 1.5 lifetimes, was ~14 s more than that takes); still failed after 32 s.
    old_expiry = pki.cert_info(old_copy.read_bytes()).not_after
    deadline = time.monotonic() + 32
    while True:
        for h in lab.hosts:
            cert = pki.cert_info(pki.TlsFiles(h.data_dir / "tls").cert_pem())
            assert cert.not_after > time.time() + 2, f"{h.name} let its certificate expire"
            seen[h.name].add(cert.serial)
        nodes = h1.cli_json("node", "ls")
        assert all(n["state"] == "ready" for n in nodes), nodes
        if all(len(s) >= 3 for s in seen.values()) and time.time() > old_expiry + 1:
            break
        assert time.monotonic() < deadline, (
            f"32 s on, certificates seen per node: {({n: len(s) for n, s in seen.items()})}")
        time.sleep(1.0)
    for h in lab.hosts:
        assert len(seen[h.name]) >= 3, (h.name, len(seen[h.name]))  # renewed at least twice
        assert "renewed this node's certificate" in h.log_tail(400)
    assert running() == pids  # the very same task processes
    # the first certificate of h3 has expired: TLS refuses it
    r = probe(lab.hosts[2], h1, "/v1/cluster/keys", cert=old_copy)
    assert "error" in r, r
    assert probe(lab.hosts[2], h1, "/v1/cluster/keys",
                 cert=node_pem(lab.hosts[2]))["status"] == 200


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.is_socket():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits


def test_secret_reaches_only_its_task_node_and_is_never_stored_or_shown_in_clear(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    """A secret's value: sealed in the Raft files, absent from inspect/ls output, logs and
    every file under the worker's data dir; its task's node (and only that node) fetches it
    over mTLS; a secret in use cannot be removed."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    value = f"s3cr3t-{time.time_ns():x}".encode()
    needles = [value, base64.b64encode(value)]
    src = tmp_path / "pass.txt"  # outside every lab host's data dir
    src.write_bytes(value)
    conf_src = tmp_path / "app.conf"
    conf_src.write_bytes(b"listen=8080\n")
    h1.cli("secret", "create", "db_pass", str(src))
    h1.cli("config", "create", "app.conf", str(conf_src))
    assert "already exists" in err(h1, "secret", "create", "db_pass", str(src))
    assert "no such secret" in err(h1, "service", "create", "--name", "bad", "--secret",
                                   "nope", "--", "sleep", "1")
    h1.cli("service", "create", "--name", "app", "--replicas", "2", "--secret",
           "db_pass,mode=0400", "--config", "app.conf,target=conf", "--", "sleep", "100000")

    def tasks() -> list[dict[str, Any]] | None:
        ts = [t for t in h1.cli_json("service", "ps", "app") if t["state"] == "running"]
        return ts if len(ts) == 2 else None
    ts = wait_until(tasks, timeout=30, what="2 running tasks of app")
    ids = {n["hostname"]: n["id"] for n in h1.cli_json("node", "ls")}
    on_w = next(t for t in ts if t["node"] in ("h2", "h3"))
    worker = h2 if on_w["node"] == "h2" else h3
    other = h3 if worker is h2 else h2
    assert on_w["node_id"] == ids[worker.name]

    # the node running the task gets the plaintext over mTLS (what resolve_task_files does)
    r = probe(worker, h1, "/v1/cluster/task-files", {"task_id": on_w["id"]},
              cert=node_pem(worker))
    assert r["status"] == 200
    files = r["body"]["files"]
    assert [(f["path"], f["mode"]) for f in files] == [("/run/secrets/db_pass", 0o400)]
    assert base64.b64decode(files[0]["data"]) == value
    # any other node, or no certificate, does not
    r = probe(other, h1, "/v1/cluster/task-files", {"task_id": on_w["id"]},
              cert=node_pem(other))
    assert r["status"] == 403 and "not assigned" in r["body"]["error"]["message"]
    assert probe(other, h1, "/v1/cluster/task-files", {"task_id": on_w["id"]})["status"] == 401

    # never shown...
    for args in (("secret", "inspect", "db_pass"), ("secret", "ls", "--format", "json"),
                 ("service", "inspect", "app"), ("service", "ps", "app", "--format", "json")):
        out = h1.cli(*args).stdout
        assert not any(n.decode() in out for n in needles), args
    assert "db_pass" in h1.cli("secret", "ls").stdout
    # ... in use: cannot be removed
    assert "in use by service(s) app" in err(h1, "secret", "rm", "db_pass")
    assert "in use" in err(h1, "config", "rm", "app.conf")
    # never on disk in the clear: the manager's Raft journal/dump, any worker file, any log
    raft_files = [p for p in (h1.data_dir / "raft").iterdir() if p.is_file()]
    assert raft_files and not _files_containing(h1.data_dir / "raft", [value])
    for w in (h2, h3):
        assert _files_containing(w.data_dir, needles) == [], w.name
    for h in lab.hosts:
        assert not any(n.decode() in h.agent_log.read_text(errors="replace") for n in needles)
    # the config is stored in the clear (configs are not secret) and readable in inspect
    conf = h1.cli_json("config", "inspect", "app.conf")[0]
    assert base64.b64decode(conf["data"]) == b"listen=8080\n"
    h1.cli("service", "rm", "app")
    wait_until(lambda: h1.cli("secret", "rm", "db_pass", check=False).returncode == 0,
               timeout=10, what="secret removable once unused")
    assert h1.cli_json("secret", "ls") == []


def test_remote_api_needs_a_current_client_certificate(lab_factory: Callable[..., Lab],
                                                       tmp_path: Path) -> None:
    """`--remote-api-port`: the CLI works from another host with a client certificate from
    `shoal ca issue-client`; no certificate, a node's certificate, or a revoked/replaced
    client certificate is refused with one clear line."""
    lab = lab_factory(2)
    h1, h2 = lab.hosts
    h1.start_agent("--remote-api-port", "2380")
    lab.form_cluster(managers=1, workers=1)
    admin = tmp_path / "admin"
    out = h1.cli("ca", "issue-client", "admin", "--out", str(admin)).stdout
    assert "written to" in out and (admin / "key.pem").stat().st_mode & 0o777 == 0o600
    remote = [str(lab.shoal), "-H", f"tcp://{h1.ip}:2380", "--tls-dir", str(admin)]

    def rcli(*args: str, check: bool = True) -> Any:
        return h2.run(*remote, *args, check=check)
    nodes = json.loads(rcli("node", "ls", "--format", "json").stdout)
    assert {n["hostname"] for n in nodes} == {"h1", "h2"}
    rcli("service", "create", "--name", "r", "--replicas", "0", "--", "sleep", "1")
    assert "r" in rcli("service", "ls").stdout

    # no certificate: the handshake is refused
    assert "error" in probe(h2, h1, "/v1/nodes", method="GET", port=2380)
    # a node's certificate is not a client certificate
    r = probe(h2, h1, "/v1/nodes", method="GET", port=2380, cert=node_pem(h2))
    assert r["status"] == 401 and "client certificate" in r["body"]["error"]["message"]
    # the CLI explains what is missing
    res = h2.run(str(lab.shoal), "-H", f"tcp://{h1.ip}:2380", "node", "ls", check=False)
    assert res.returncode == 1 and "--tls-dir" in res.stderr and "Traceback" not in res.stderr

    # re-issuing replaces the old certificate; revoking removes the current one
    old = tmp_path / "old"
    old.mkdir()
    for f in ("ca.pem", "cert.pem", "key.pem"):
        (old / f).write_bytes((admin / f).read_bytes())
    h1.cli("ca", "issue-client", "admin", "--out", str(admin))
    res = h2.run(str(lab.shoal), "-H", f"tcp://{h1.ip}:2380", "--tls-dir", str(old), "node",
                 "ls", check=False)
    assert res.returncode == 1 and "revoked or replaced" in res.stderr
    rcli("node", "ls")
    h1.cli("ca", "revoke-client", "admin")
    res = rcli("node", "ls", check=False)
    assert res.returncode == 1 and "revoked" in res.stderr
    assert json.loads(h1.cli("ca", "info").stdout)["clients"] == []


def test_secret_is_a_0400_file_in_the_task_and_nowhere_on_the_workers_disk(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    """Inside every task the secret is /run/secrets/NAME with mode 0400 and the right
    content (the task checks a hash and prints a marker, never the value), the config is at
    /NAME (Docker's place for `--config NAME`); no file under any node's data dir holds the
    value."""
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1 = lab.hosts[0]
    value = f"in-task-{time.time_ns():x}".encode()
    src = tmp_path / "v"
    src.write_bytes(value)
    h1.cli("secret", "create", "token", str(src))
    (tmp_path / "c").write_bytes(b"a=1\n")
    h1.cli("config", "create", "conf", str(tmp_path / "c"))
    digest = hashlib.sha256(value).hexdigest()
    script = (f'test "$(sha256sum < /run/secrets/token)" = "{digest}  -" && '
              'echo "MARK $(stat -c %a /run/secrets/token) $(cat /conf)"; '
              'sleep 100000')
    h1.cli("service", "create", "--name", "s", "--replicas", "2", "--secret",
           "token,mode=0400", "--config", "conf", "--", "sh", "-c", script)

    def marks() -> list[str] | None:
        found = []
        for h in lab.hosts:
            for log in h.data_dir.glob("tasks/*/stdout.log*"):
                found += [line for line in log.read_text(errors="replace").splitlines()
                          if "MARK" in line]
        return found if len(found) == 2 else None
    found = wait_until(marks, timeout=40, what="both tasks report their secret file")
    assert all("MARK 400 a=1" in line for line in found), found
    needles = [value, base64.b64encode(value)]
    for h in lab.hosts:
        assert _files_containing(h.data_dir, needles) == [], h.name
