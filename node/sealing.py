"""Sealing: AES-256-GCM encryption of what the replicated state must not hold in the clear.

Owns: the *manager key* format and ``seal``/``unseal``. The manager key is 32 random bytes
made at ``shoal init``, handed only to managers (over mTLS, ``/v1/cluster/manager-keys``)
and kept in their ``node.json`` (0600); it is never written to the Raft log. Workers run a
read-only replica of the whole state, so everything sealed with it — the CA private key,
the join-token secrets, secret values — is unreadable on a worker and in the Raft files
on disk. Must not touch: where sealed data is stored (the state) or who gets the key
(the agent).

A sealed blob is ``b"\\x01" + nonce(12) + ciphertext+tag``; the associated data names what
it is (``shoal/secret/<id>``, ``shoal/ca-key``...), so a sealed value copied into another
slot of the state does not unseal there.

Errors::

    SealError    the blob is malformed, or was sealed under another key or for another slot
                 (node/errors.py)
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shoal.node.errors import SealError

VERSION = b"\x01"
KEY_BYTES = 32
NONCE_BYTES = 12
TEXT_PREFIX = "sealed:"

AAD_CA_KEY = b"shoal/ca-key"


def token_aad(role: str) -> bytes:
    return b"shoal/join-token/" + role.encode()


def secret_aad(secret_id: str) -> bytes:
    return b"shoal/secret/" + secret_id.encode()


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise SealError("the manager key must be 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise SealError("the manager key must be 32 bytes")
    if not isinstance(blob, bytes) or len(blob) < 1 + NONCE_BYTES + 16 or \
            blob[:1] != VERSION:
        raise SealError("not a sealed value")
    try:
        return AESGCM(key).decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError("cannot unseal: wrong manager key or value moved") from None


def seal_text(key: bytes, text: str, aad: bytes) -> str:
    """For string fields of the state: ``sealed:<base64>``."""
    return TEXT_PREFIX + base64.b64encode(seal(key, text.encode(), aad)).decode()


def unseal_text(key: bytes, sealed: str, aad: bytes) -> str:
    if not sealed.startswith(TEXT_PREFIX):
        raise SealError("not a sealed text")
    try:
        blob = base64.b64decode(sealed[len(TEXT_PREFIX):], validate=True)
    except ValueError:
        raise SealError("not a sealed text") from None
    return unseal(key, blob, aad).decode()


__all__ = ["AAD_CA_KEY", "SealError", "new_key", "seal", "seal_text", "secret_aad",
           "token_aad", "unseal", "unseal_text"]
