"""Security building blocks without a cluster: the PKI, sealing, join tokens, peer
authorisation and the TLS listener, in one process (loopback only, no namespaces).

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from shoal.node import pki
from shoal.node.api import peer_of, tls_listener
from shoal.node.errors import Forbidden, NotManager, SealError, Unauthenticated, Unavailable
from shoal.node.sealing import (
    AAD_CA_KEY,
    new_key,
    seal,
    seal_text,
    secret_aad,
    token_aad,
    unseal,
    unseal_text,
)
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.tokens import make_token, new_secret, parse_token, role_for
from shoal.raft.errors import ValidationError
from shoal.raft.models import Node, NodeRole, TaskState, task_from_dict, to_dict
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_file_refs

NOW = time.time()
CLUSTER = "c0ffee" * 5


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    cert, key = pki.create_ca(CLUSTER, NOW)
    return pki.CertificateAuthority(cert, key)


def issue(ca: pki.CertificateAuthority, subject: str, role: str, lifetime: float = 3600,
          cluster: str = CLUSTER) -> tuple[bytes, bytes]:
    key = pki.new_key()
    return ca.issue(pki.make_csr(key), subject, role, cluster, NOW, lifetime,
                    "127.0.0.1"), pki.key_pem(key)


# ------------------------------------------------------------------------------------ PKI

def test_issued_certificate_names_node_role_and_cluster(ca: pki.CertificateAuthority) -> None:
    """The CA decides the subject: the CSR's own name is ignored."""
    cert, _ = issue(ca, "node1", "worker", lifetime=90 * 86400)
    info = pki.cert_info(cert)
    assert (info.subject_id, info.role, info.cluster_id) == ("node1", "worker", CLUSTER)
    assert info.lifetime == pytest.approx(90 * 86400, abs=2)
    assert info.issued_at == pytest.approx(NOW, abs=2)


def test_ca_digest_is_what_tokens_carry(ca: pki.CertificateAuthority) -> None:
    """The token's digest is the SHA-256 of the CA certificate: stable, 64 hex digits."""
    token = make_token(ca.digest, new_secret())
    digest, _ = parse_token(token)
    assert digest == pki.ca_digest(ca.cert_pem) and len(digest) == 64


def test_certificate_of_another_ca_does_not_verify(ca: pki.CertificateAuthority) -> None:
    other_cert, other_key = pki.create_ca("other", NOW)
    other = pki.CertificateAuthority(other_cert, other_key)
    key = pki.new_key()
    cert = other.issue(pki.make_csr(key), "n", "manager", CLUSTER, NOW, 60)
    with pytest.raises(pki.PkiError, match="not signed by the cluster CA"):
        pki.verify_issued(cert, ca.cert_pem, key)
    mine = ca.issue(pki.make_csr(key), "n", "manager", CLUSTER, NOW, 60)
    with pytest.raises(pki.PkiError, match="not for this node's key"):
        pki.verify_issued(mine, ca.cert_pem, pki.new_key())
    assert pki.verify_issued(mine, ca.cert_pem, key).subject_id == "n"


def test_malformed_or_forged_requests_are_refused(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(pki.PkiError, match="malformed"):
        ca.issue("not a csr", "n", "worker", CLUSTER, NOW, 60)
    with pytest.raises(pki.PkiError, match="unknown role"):
        ca.issue(pki.make_csr(pki.new_key()), "n", "root", CLUSTER, NOW, 60)


def test_node_certificate_never_outlives_the_ca(ca: pki.CertificateAuthority) -> None:
    cert, _ = issue(ca, "n", "worker", lifetime=100 * 365 * 86400)
    assert pki.cert_info(cert).not_after <= pki.cert_info(ca.cert_pem).not_after


def test_ca_key_must_match_certificate(ca: pki.CertificateAuthority) -> None:
    _, other_key = pki.create_ca("x", NOW)
    with pytest.raises(pki.PkiError, match="does not belong"):
        pki.CertificateAuthority(ca.cert_pem, other_key)


def test_tls_files_keep_key_with_certificate_and_private(tmp_path: Path,
                                                         ca: pki.CertificateAuthority) -> None:
    """Certificate and key are one 0600 file, replaced by one rename on renewal."""
    files = pki.TlsFiles(tmp_path / "tls")
    cert, key = issue(ca, "n1", "manager")
    files.save(ca.cert_pem, cert, key)
    assert files.cert.stat().st_mode & 0o777 == 0o600
    assert files.info().subject_id == "n1"
    cert2, key2 = issue(ca, "n1", "manager")
    files.save(ca.cert_pem, cert2, key2)
    assert files.info().serial == pki.cert_info(cert2).serial
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(files.cert))  # key matches


# ------------------------------------------------------------------------------------ sealing

def test_sealed_values_open_only_with_the_key_and_in_their_slot() -> None:
    key = new_key()
    blob = seal(key, b"hunter2", secret_aad("s1"))
    assert b"hunter2" not in blob
    assert unseal(key, blob, secret_aad("s1")) == b"hunter2"
    with pytest.raises(SealError):
        unseal(new_key(), blob, secret_aad("s1"))  # another cluster's / a worker's guess
    with pytest.raises(SealError):
        unseal(key, blob, secret_aad("s2"))  # moved to another secret
    with pytest.raises(SealError):
        unseal(key, blob[:-1] + bytes([blob[-1] ^ 1]), secret_aad("s1"))  # tampered
    text = seal_text(key, "abc", token_aad("worker"))
    assert unseal_text(key, text, token_aad("worker")) == "abc"
    with pytest.raises(SealError):
        unseal_text(key, text, token_aad("manager"))


# ------------------------------------------------------------------------------------ tokens

def test_token_role_and_rejections() -> None:
    digest, w, m = "ab" * 32, new_secret(), new_secret()
    assert role_for(make_token(digest, w), digest, w, m) == "worker"
    assert role_for(make_token(digest, m), digest, w, m) == "manager"
    assert role_for(make_token(digest, new_secret()), digest, w, m) is None  # wrong/rotated
    assert role_for(make_token("cd" * 32, w), digest, w, m) is None  # other cluster's CA
    assert role_for("SHOAL-1-xyz", digest, w, m) is None


def test_state_holds_only_sealed_token_secrets_and_ca_key() -> None:
    """What the Raft log carries for init contains no token secret and no CA key in the
    clear (workers replicate the log)."""
    key, ca_cert, ca_key = new_key(), *pki.create_ca(CLUSTER, NOW)
    w, m = new_secret(), new_secret()
    cmds = [{"op": "cluster_init", "cluster_id": CLUSTER, "now": NOW,
             "worker_secret": seal_text(key, w, token_aad("worker")),
             "manager_secret": seal_text(key, m, token_aad("manager")),
             "digest": pki.ca_digest(ca_cert)},
            {"op": "ca_init", "ca_cert": ca_cert.decode(),
             "ca_key": seal(key, ca_key, AAD_CA_KEY)}]
    log = b"".join(msgpack.packb(c, use_bin_type=True) for c in cmds)
    for plain in (w.encode(), m.encode(), ca_key, ca_key.split(b"\n")[1]):
        assert plain not in log
    st = ClusterState()
    for c in cmds:
        assert "ok" in st.apply(c)
    assert "error" in st.apply(cmds[1])  # the CA is set once
    assert unseal(key, st.cluster.ca_key, AAD_CA_KEY) == ca_key


# ------------------------------------------------------------------------------------ authorize

class _Store:
    def __init__(self, st: ClusterState) -> None:
        self.st = st
        self.ready = True

    def is_ready(self) -> bool:
        return self.ready

    def snapshot(self) -> Any:
        return self.st.snapshot()


def _security(tmp_path: Path, nodes: dict[str, NodeRole]) -> Security:
    st = ClusterState()
    for i, (nid, role) in enumerate(nodes.items()):
        n = Node(id=nid, hostname=nid, addr=f"10.0.0.{i + 1}", api_port=2377, raft_port=2378,
                 role=role)
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(n)})
    ctx: Any = SimpleNamespace(
        data_dir=tmp_path, store=_Store(st), config=SimpleNamespace(cert_lifetime=60.0),
        identity=SimpleNamespace(cluster_id=CLUSTER, role="manager", manager_key=new_key()))
    return Security(ctx)


def _peer(subject: str, role: str, cluster: str = CLUSTER) -> pki.CertInfo:
    return pki.CertInfo(subject, role, cluster, 1, NOW - 60, NOW + 60)


def test_only_current_members_pass_and_manager_routes_need_two_manager_facts(
        tmp_path: Path) -> None:
    """No certificate, another cluster's, or a removed node's → Unauthenticated; a worker
    (or a manager demoted since its certificate was issued) → Forbidden on manager routes."""
    sec = _security(tmp_path, {"m1": NodeRole.MANAGER, "w1": NodeRole.WORKER,
                               "demoted": NodeRole.WORKER})
    assert sec.authorize(_peer("m1", "manager"), manager=True).id == "m1"
    assert sec.authorize(_peer("w1", "worker")).id == "w1"
    with pytest.raises(Unauthenticated, match="certificate of this cluster is required"):
        sec.authorize(None)
    with pytest.raises(Unauthenticated):
        sec.authorize(_peer("m1", "manager", cluster="other"))
    with pytest.raises(Unauthenticated, match="not a member"):
        sec.authorize(_peer("gone", "worker"))
    with pytest.raises(Unauthenticated):
        sec.authorize(_peer("m1", "client"))  # client certs are for the remote API only
    with pytest.raises(Forbidden, match="only a manager"):
        sec.authorize(_peer("w1", "worker"), manager=True)
    with pytest.raises(Forbidden, match="only a manager"):
        sec.authorize(_peer("demoted", "manager"), manager=True)


def test_a_replica_still_catching_up_refuses_unknown_nodes_as_retryable(
        tmp_path: Path) -> None:
    """A restarted manager whose replica is not ready yet must not call a member "removed":
    the caller gets a retryable Unavailable, and Unauthenticated once the replica is ready."""
    sec = _security(tmp_path, {"m1": NodeRole.MANAGER})
    sec.ctx.store.ready = False
    with pytest.raises(Unavailable, match="catching up"):
        sec.authorize(_peer("w9", "worker"))
    assert sec.authorize(_peer("m1", "manager")).id == "m1"  # known: fine even while catching up
    sec.ctx.store.ready = True
    with pytest.raises(Unauthenticated, match="not a member"):
        sec.authorize(_peer("w9", "worker"))


# ------------------------------------------------------------------------------------ TLS

async def test_tls_listener_mutual_auth_and_role_names(tmp_path: Path,
                                                       ca: pki.CertificateAuthority) -> None:
    """Before init the listener completes no handshake; after, it serves callers with and
    without a client certificate (the route decides), reports the caller's identity,
    refuses a foreign CA's certificate; a client verifying a role name refuses a server
    of another role."""
    def files(name: str, role: str) -> pki.TlsFiles:
        f = pki.TlsFiles(tmp_path / name)
        cert, key = issue(ca, name, role)
        f.save(ca.cert_pem, cert, key)
        return f

    server_files, worker_files = files("m1", "manager"), files("w1", "worker")
    current: dict[str, ssl.SSLContext | None] = {"ctx": None}

    async def who(req: web.Request) -> web.Response:
        peer = peer_of(req)
        return web.json_response({"peer": peer.subject_id if peer else None,
                                  "role": peer.role if peer else None})

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_listener(
        lambda: current["ctx"], False))
    await site.start()
    port = runner.addresses[0][1]
    url = f"https://127.0.0.1:{port}/"
    worker_ctx = pki.client_context(ca.cert_pem, worker_files.cert)
    try:
        async with aiohttp.ClientSession() as http:
            async def get(ctx: ssl.SSLContext, name: str = "manager.shoal") -> Any:
                async with http.get(url, ssl=ctx, server_hostname=name,
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    return await resp.json()

            with pytest.raises(aiohttp.ClientError):
                await get(worker_ctx)  # not a member yet: nothing to serve
            current["ctx"] = pki.server_context(ca.cert_pem, server_files.cert, False)
            assert await get(worker_ctx) == {"peer": "w1", "role": "worker"}
            assert await get(pki.client_context(ca.cert_pem)) == {"peer": None, "role": None}
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await get(worker_ctx, "worker.shoal")  # the server is a manager
            other_cert, other_key = pki.create_ca("other", NOW)
            other = pki.CertificateAuthority(other_cert, other_key)
            forged = pki.TlsFiles(tmp_path / "forged")
            key = pki.new_key()
            forged.save(other_cert, other.issue(pki.make_csr(key), "m1", "manager", CLUSTER,
                                                NOW, 60), pki.key_pem(key))
            with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
                await get(pki.client_context(ca.cert_pem, forged.cert))
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------ secrets

def test_file_refs_validation() -> None:
    refs = validate_file_refs([{"name": "db.pass"}, {"name": "tls", "target": "key.pem",
                                                     "mode": 0o400}], "secrets")
    assert [(r.name, r.file_name, r.mode) for r in refs] == [("db.pass", "db.pass", 0o444),
                                                             ("tls", "key.pem", 0o400)]
    for bad in ([{"name": "a", "target": "../etc/passwd"}], [{"name": "a", "target": "x/y"}],
                [{"name": "a"}, {"name": "b", "target": "a"}], [{"name": "a", "mode": 0o1777}],
                [{"name": "-a"}], [{"name": "a", "uid": 0}], "a"):
        with pytest.raises(ValidationError):
            validate_file_refs(bad, "secrets")


def _spec(**kw: Any) -> dict[str, Any]:
    return {"name": "app", "command": ["sleep", "1"], **kw}


def test_secret_in_use_cannot_be_removed_and_state_holds_it_sealed() -> None:
    key = new_key()
    st = ClusterState()
    sealed = seal(key, b"pa55", secret_aad("s1"))
    assert "ok" in st.apply({"op": "secret_create", "id": "s1", "name": "db", "data": sealed,
                             "now": 1.0})
    assert st.apply({"op": "secret_create", "id": "s2", "name": "db", "data": sealed,
                     "now": 1.0})["error"]["code"] == "exists"
    assert "ok" in st.apply({"op": "config_create", "id": "c1", "name": "conf",
                             "data": b"x=1", "now": 1.0})
    assert "ok" in st.apply({"op": "service_create", "id": "v1", "now": 1.0, "spec": _spec(
        secrets=[{"name": "db", "mode": 0o400}], configs=[{"name": "conf"}])})
    res = st.apply({"op": "secret_remove", "id": "s1"})
    assert res["error"]["code"] == "in_use" and "app" in res["error"]["message"]
    assert st.apply({"op": "config_remove", "id": "c1"})["error"]["code"] == "in_use"
    assert b"pa55" not in msgpack.packb(to_dict(st.snapshot()), use_bin_type=True)
    assert "ok" in st.apply({"op": "service_remove", "id": "v1", "now": 2.0})
    assert "ok" in st.apply({"op": "secret_remove", "id": "s1"})
    assert "ok" in st.apply({"op": "config_remove", "id": "c1"})


class _Security:
    """Security for the fakes: the manager key, authorize, and call() routed in-process
    (``ctx``: the node context it reads)."""

    def __init__(self, agent: Any, manager_key: bytes, route: Any = None) -> None:
        self.ctx, self.key, self.route = agent, manager_key, route

    def manager_key(self) -> bytes:
        if not self.key:
            raise NotManager("no key")
        return self.key

    def authorize(self, peer: pki.CertInfo | None, manager: bool = False) -> Node:
        return Security.authorize(self, peer, manager)  # type: ignore[arg-type]

    def member(self, peer: pki.CertInfo | None) -> tuple[Node, bool]:
        return Security.member(self, peer)  # type: ignore[arg-type]

    async def call(self, addr: str, path: str, body: dict[str, Any], **_: Any) -> Any:
        assert path == "/v1/cluster/task-files"
        return self.route(body)


async def test_task_files_reach_only_the_node_running_the_task(tmp_path: Path) -> None:
    """A worker resolves its task's files: the config from its replica, the secret from a
    manager over (here: simulated) mTLS; the manager gives a secret only to the node the
    task is assigned to, and only while the task should run."""
    key = new_key()
    st = ClusterState()
    for i, (nid, role) in enumerate((("m1", NodeRole.MANAGER), ("w1", NodeRole.WORKER),
                                     ("w2", NodeRole.WORKER))):
        n = Node(id=nid, hostname=nid, addr=f"10.0.0.{i + 1}", api_port=2377, raft_port=2378,
                 role=role)
        st.apply({"op": "node_add", "now": 1.0, "node": to_dict(n)})
    st.apply({"op": "secret_create", "id": "s1", "name": "db",
              "data": seal(key, b"pa55", secret_aad("s1")), "now": 1.0})
    st.apply({"op": "config_create", "id": "c1", "name": "conf", "data": b"x=1", "now": 1.0})
    spec = _spec(secrets=[{"name": "db", "target": "db.txt", "mode": 0o400}],
                 configs=[{"name": "conf"}])
    st.apply({"op": "service_create", "id": "v1", "now": 1.0, "spec": spec})
    task = task_from_dict({"id": "t1", "service_id": "v1", "service_name": "app", "slot": 1,
                           "spec": spec, "service_version": 1, "desired_state": 512,
                           "node_id": "w1", "status": {"state": 192}})
    st.tasks["t1"] = task

    def agent(node_id: str, role: str, mkey: bytes) -> Any:
        a: Any = SimpleNamespace(store=_Store(st), data_dir=tmp_path)
        a.identity = SimpleNamespace(node_id=node_id, cluster_id=CLUSTER, role=role,
                                     manager_key=mkey)
        a.require_member = a.require_manager = lambda: a.store
        a.store.leader_addr = lambda: "10.0.0.1:2378"
        return a

    manager = agent("m1", "manager", key)
    manager.security = _Security(manager, key)
    manager.secrets = SecretsApi(manager, manager.security)
    calls: list[str] = []

    def route_as(node_id: str) -> Any:
        def route(body: dict[str, Any]) -> Any:
            calls.append(node_id)
            return manager.secrets.task_files(_peer(node_id, "worker"), body["task_id"])
        return route

    worker = agent("w1", "worker", b"")
    worker.security = _Security(worker, b"", route_as("w1"))
    files = await SecretsApi(worker, worker.security).resolve_task_files(task)
    assert files == {"/run/secrets/db.txt": (b"pa55", 0o400),
                     "/run/configs/conf": (b"x=1", 0o444)}
    assert calls == ["w1"]
    # the manager itself unseals locally, no call
    assert await manager.secrets.resolve_task_files(task) == files
    # another worker asking for w1's task is refused
    with pytest.raises(Forbidden, match="not assigned"):
        manager.secrets.task_files(_peer("w2", "worker"), "t1")
    st.tasks["t1"] = dataclasses.replace(task, desired_state=TaskState.SHUTDOWN)
    with pytest.raises(Forbidden, match="being stopped"):
        manager.secrets.task_files(_peer("w1", "worker"), "t1")



# ------------------------------------------------------------------------------------ Raft

def test_raft_messages_are_sealed_and_tampering_is_detected() -> None:
    """shoal's Raft encryptor: same secret opens, another secret or a flipped bit does not;
    the timestamp pysyncobj orders messages by is authenticated; nonces never repeat."""
    from cryptography.exceptions import InvalidTag

    from shoal.raft.transport import AeadEncryptor

    a, b = AeadEncryptor("s" * 43), AeadEncryptor("s" * 43)
    token = a.encrypt_at_time(b"append entries", 1234)
    assert b"append entries" not in token
    assert b.extract_timestamp(token) == 1234 and b.decrypt(token) == b"append entries"
    with pytest.raises(InvalidTag):
        AeadEncryptor("t" * 43).decrypt(token)
    forged_time = token[:1] + (9999).to_bytes(8, "big") + token[9:]
    with pytest.raises(InvalidTag):
        b.decrypt(forged_time)
    with pytest.raises(InvalidTag):
        b.decrypt(token[:-1] + bytes([token[-1] ^ 1]))
    with pytest.raises(ValueError):
        b.extract_timestamp(b"\x02" + token[1:])
    nonces = {a.encrypt_at_time(b"x", 1)[9:21] for _ in range(1000)}
    assert len(nonces) == 1000
