"""Autolock's key wrapping, without a cluster: the unlock key, the wrapped keys in node.json,
the encrypted TLS key in node.pem (shoal.node.sealing, shoal.node.pki, shoal.node.config)."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import pytest

from shoal.node import pki, sealing
from shoal.node.config import NodeIdentity
from shoal.node.errors import SealError

KEYS = {"raft_password": "r" * 43, "manager_key": "ab" * 32, "tls_password": "cd" * 32}


def test_unlock_key_round_trip_and_format() -> None:
    key = sealing.new_unlock_key()
    assert key.startswith("SHOALKEY-1-") and len(key) == len("SHOALKEY-1-") + 43
    assert len(sealing.parse_unlock_key(key)) == 32
    assert sealing.new_unlock_key() != key
    wrapped = sealing.wrap_keys(key, "n1", KEYS)
    assert "r" * 43 not in wrapped and "ab" * 32 not in wrapped
    assert sealing.unwrap_keys(key, "n1", wrapped) == KEYS
    assert sealing.unwrap_keys("  " + key + "\n", "n1", wrapped) == KEYS  # pasted with spaces


def test_a_wrong_unlock_key_opens_nothing() -> None:
    key, other = sealing.new_unlock_key(), sealing.new_unlock_key()
    wrapped = sealing.wrap_keys(key, "n1", KEYS)
    with pytest.raises(SealError, match="does not open"):
        sealing.unwrap_keys(other, "n1", wrapped)


def test_wrapped_keys_are_bound_to_their_node() -> None:
    """Keys copied from another manager's node.json do not open under this node's id."""
    key = sealing.new_unlock_key()
    with pytest.raises(SealError):
        sealing.unwrap_keys(key, "n2", sealing.wrap_keys(key, "n1", KEYS))


@pytest.mark.parametrize("bad", ["", "SWMKEY-1-abc", "SHOALKEY-1-short", "SHOALKEY-2-" + "a" * 43,
                                 "SHOALKEY-1-" + "!" * 43])
def test_malformed_unlock_keys_are_refused_by_name(bad: str) -> None:
    with pytest.raises(SealError, match="malformed unlock key"):
        sealing.parse_unlock_key(bad)


def test_node_json_of_a_locked_manager_holds_no_key_in_the_clear(tmp_path: Path) -> None:
    key = sealing.new_unlock_key()
    ident = NodeIdentity(node_id="n1", cluster_id="c1", role="manager", raft_password="p" * 43,
                         voters=["10.0.0.1:2378"], manager_key=b"\x07" * 32)
    ident.key_wrap = sealing.wrap_keys(key, "n1", {"raft_password": ident.raft_password,
                                                   "manager_key": ident.manager_key.hex(),
                                                   "tls_password": ""})
    ident.save(tmp_path)
    raw = (tmp_path / "node.json").read_text()
    assert "p" * 43 not in raw and "07" * 32 not in raw
    assert json.loads(raw)["raft_password"] == "" and json.loads(raw)["manager_key"] == ""
    loaded = NodeIdentity.load(tmp_path)
    assert loaded is not None and loaded.key_wrap == ident.key_wrap
    assert loaded.raft_password == "" and loaded.manager_key == b""
    opened = sealing.unwrap_keys(key, "n1", loaded.key_wrap)
    assert opened["raft_password"] == "p" * 43
    assert bytes.fromhex(opened["manager_key"]) == b"\x07" * 32
    # autolock off again: the keys are back in the file
    ident.key_wrap = ""
    ident.save(tmp_path)
    again = NodeIdentity.load(tmp_path)
    assert again is not None and again.raft_password == "p" * 43


def _node_files(tmp_path: Path) -> pki.TlsFiles:
    ca_pem, ca_key = pki.create_ca("c1", time.time())
    ca = pki.CertificateAuthority(ca_pem, ca_key)
    key = pki.new_key()
    cert = ca.issue(pki.make_csr(key), "n1", pki.ROLE_MANAGER, "c1",
                    time.time(), 3600.0)
    files = pki.TlsFiles(tmp_path / "tls")
    files.save(ca_pem, cert, pki.key_pem(key))
    return files


def test_tls_key_encrypted_at_rest_and_usable_with_its_password(tmp_path: Path) -> None:
    files = _node_files(tmp_path)
    clear = files.key()
    files.repassword(b"s3cret-password")
    raw = files.cert.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in raw and pki.key_pem(clear) not in raw
    # without the password neither OpenSSL nor cryptography can use it
    with pytest.raises(ssl.SSLError):
        pki.client_context(files.ca_pem(), files.cert, password=b"wrong")
    with pytest.raises(pki.PkiError):
        pki.TlsFiles(files.dir).key()
    # with it, both can; the certificate is unchanged
    pki.server_context(files.ca_pem(), files.cert, True, password=b"s3cret-password")
    assert pki.key_pem(files.key()) == pki.key_pem(clear)
    assert files.info().subject_id == "n1"
    # a renewal while locked writes the key encrypted too
    files.save(files.ca_pem(), files.cert_pem(), pki.key_pem(clear))
    assert b"ENCRYPTED PRIVATE KEY" in files.cert.read_bytes()
    assert pki.key_pem(files.key()) == pki.key_pem(clear)
    # back in the clear
    files.repassword(None)
    assert b"ENCRYPTED" not in files.cert.read_bytes()
    pki.client_context(files.ca_pem(), files.cert)


def test_a_password_for_a_key_in_the_clear_still_opens_it(tmp_path: Path) -> None:
    """Autolock turned on and the agent killed before node.pem was re-encrypted: the
    unwrapped password must still open the (clear) key."""
    files = _node_files(tmp_path)
    files.password = b"anything"
    files.key()
    pki.client_context(files.ca_pem(), files.cert, password=files.password)
