"""CA rotation without a cluster: the new root, its cross-signature, which certificates each
trust set accepts over a real TLS handshake, and the state machine's rotation phases."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from shoal.node import pki, sealing
from shoal.raft.state import ClusterState

NOW = time.time()


def _ca(rotated: bool = False) -> pki.CertificateAuthority:
    cert, key = pki.create_ca("c1", NOW, rotated=rotated)
    return pki.CertificateAuthority(cert, key)


def _node(tmp: Path, name: str, ca: pki.CertificateAuthority, trust: bytes,
          chain: bytes = b"") -> pki.TlsFiles:
    key = pki.new_key()
    cert = ca.issue(pki.make_csr(key), name, pki.ROLE_MANAGER, "c1", NOW, 3600.0)
    files = pki.TlsFiles(tmp / name)
    files.save(trust, pki.bundle(cert, chain), pki.key_pem(key))
    return files


def _handshake(server: pki.TlsFiles, client: pki.TlsFiles) -> str:
    """"" if mutual TLS between the two works (both sides verify), else the error."""
    s_ctx = pki.server_context(server.ca_pem(), server.cert, require_client_cert=True)
    c_ctx = pki.client_context(client.ca_pem(), client.cert)
    a, b = socket.socketpair()
    errors: list[str] = []

    def serve() -> None:
        try:
            with s_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(f"server: {exc}")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with c_ctx.wrap_socket(b, server_hostname=pki.role_hostname("manager")) as c:
            c.sendall(b"x")
    except (ssl.SSLError, OSError) as exc:
        errors.append(f"client: {exc}")
    t.join(5)
    a.close()
    b.close()
    return "; ".join(errors)


def test_a_rotated_root_has_its_own_name_and_the_old_root_cross_signs_it() -> None:
    old, new = _ca(), _ca(rotated=True)
    assert old.cert.subject != new.cert.subject
    cross = pki.load_certs(old.cross_sign(new.cert_pem, NOW))[0]
    assert cross.subject == new.cert.subject and cross.issuer == old.cert.subject
    assert cross.public_key() == new.cert.public_key()
    cross.verify_directly_issued_by(old.cert)


def test_trust_during_and_after_a_rotation(tmp_path: Path) -> None:
    """Old-root and new-root certificates both work while nodes trust both roots; a node
    still trusting only the old root accepts a new-root peer through the cross-signed root;
    after the old root is dropped, an old-root certificate is refused."""
    old, new = _ca(), _ca(rotated=True)
    cross = old.cross_sign(new.cert_pem, NOW)
    both = pki.bundle(old.cert_pem, new.cert_pem)
    a_old = _node(tmp_path, "a", old, old.cert_pem)  # not yet told about the rotation
    b_both = _node(tmp_path, "b", old, both)  # trusts both, old certificate
    c_new = _node(tmp_path, "c", new, both, chain=cross)  # re-issued under the new root
    d_after = _node(tmp_path, "d", new, new.cert_pem, chain=cross)  # after the finish
    assert _handshake(b_both, c_new) == ""
    assert _handshake(c_new, b_both) == ""
    assert _handshake(a_old, b_both) == ""
    assert _handshake(c_new, a_old) == "", "the cross-signed root must bridge old trust"
    assert _handshake(d_after, c_new) == ""
    err = _handshake(d_after, a_old)
    assert "certificate verify failed" in err or "unknown ca" in err.lower(), err


def test_verify_issued_accepts_either_root_of_a_bundle(tmp_path: Path) -> None:
    old, new = _ca(), _ca(rotated=True)
    key = pki.new_key()
    cert = new.issue(pki.make_csr(key), "n1", pki.ROLE_WORKER, "c1", NOW, 60.0)
    assert pki.verify_issued(cert, pki.bundle(old.cert_pem, new.cert_pem), key).role == "worker"
    with pytest.raises(pki.PkiError):
        pki.verify_issued(cert, old.cert_pem, key)


def _state() -> ClusterState:
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_init", "cluster_id": "c1", "now": NOW,
                             "digest": "0" * 64, "worker_secret": "w", "manager_secret": "m"})
    assert "ok" in st.apply({"op": "ca_init", "ca_cert": "OLD", "ca_key": b"k"})
    for n in ("n1", "n2"):
        r = st.apply({"op": "node_add", "now": NOW, "node": {
            "id": n, "hostname": n, "addr": f"10.0.0.{n[1]}", "api_port": 2377,
            "raft_port": 2378, "role": "manager"}})
        assert "ok" in r, r
    return st


def test_rotation_phases_in_the_state_machine() -> None:
    st = _state()
    d = "a" * 64
    # finishing before every node trusts the new root and holds a certificate is refused
    assert "ok" in st.apply({"op": "ca_rotate_start", "cert": "NEW", "key": b"nk",
                             "cross": "X", "digest": d, "cert_expiry": 3600.0})
    assert st.cluster.ca_phase == "trust" and st.cluster.cert_expiry == 3600.0
    assert "error" in st.apply({"op": "ca_rotate_finish", "digest": d, "ca_key": b"k2"})
    # an ack for another (replaced) rotation changes nothing
    assert st.apply({"op": "ca_rotate_ack", "node_id": "n1", "stage": 1,
                     "digest": "b" * 64})["stale"] is True
    assert st.apply({"op": "ca_rotate_ack", "node_id": "n1", "stage": 2, "digest": d}) == \
        {"ok": True, "stale": False}
    assert st.apply({"op": "ca_rotate_ack", "node_id": "n1", "stage": 1, "digest": d})
    assert st.cluster.ca_acks == {"n1": 2}  # never backwards
    assert "error" in st.apply({"op": "ca_rotate_ack", "node_id": "gone", "stage": 1,
                                "digest": d})
    assert "ok" in st.apply({"op": "ca_rotate_phase", "phase": "issue", "digest": d})
    # no other rotation while certificates of this one are being issued
    refused = st.apply({"op": "ca_rotate_start", "cert": "NEW2", "key": b"nk2", "cross": "X2",
                        "digest": "c" * 64})
    assert refused["error"]["code"] == "conflict" and st.cluster.ca_next_cert == "NEW"
    assert "ok" in st.apply({"op": "ca_rotate_finish", "digest": d, "ca_key": b"k2"})
    c = st.cluster
    assert (c.ca_cert, c.ca_key, c.digest) == ("NEW", b"k2", d)
    assert (c.ca_phase, c.ca_next_cert, c.ca_acks) == ("", "", {})
    # a stale finish (replayed) is refused and changes nothing
    assert "error" in st.apply({"op": "ca_rotate_finish", "digest": d, "ca_key": b"zz"})
    assert st.cluster.ca_key == b"k2"


def test_autolock_op_stores_only_sealed_text() -> None:
    st = _state()
    mk = sealing.new_key()
    key = sealing.new_unlock_key()
    sealed = sealing.seal_text(mk, key, sealing.AAD_UNLOCK_KEY)
    assert "ok" in st.apply({"op": "cluster_autolock", "unlock_key": sealed})
    assert key not in st.cluster.unlock_key
    assert sealing.unseal_text(mk, st.cluster.unlock_key, sealing.AAD_UNLOCK_KEY) == key
    assert "error" in st.apply({"op": "cluster_autolock", "unlock_key": 5})
    assert "ok" in st.apply({"op": "cluster_autolock", "unlock_key": ""})
    assert st.cluster.unlock_key == ""
