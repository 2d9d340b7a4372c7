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

Also owns autolock's key wrapping (Docker's ``swarm init --autolock``): the *unlock key*
``SHOALKEY-1-<base64url of 32 random bytes>`` is shown to the user once; HKDF-SHA256 derives
from it a key-encryption key (KEK) that wraps a manager's keys at rest (``wrap_keys``: the
Raft secret, the managers' key and the random password of its PKCS#8-encrypted TLS key,
AES-256-GCM bound to the node id), so changing the unlock key rewrites one file. The
unlock key itself travels only inside the replicated state, sealed under the managers' key
(``AAD_UNLOCK_KEY``), so every manager can re-wrap its own keys when it changes.

Errors::

    SealError    the blob is malformed, or was sealed under another key or for another slot;
                 an unlock key that is malformed or does not open the wrapped keys
                 (node/errors.py)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.node.errors import SealError

VERSION = b"\x01"
KEY_BYTES = 32
NONCE_BYTES = 12
TEXT_PREFIX = "sealed:"

AAD_CA_KEY = b"shoal/ca-key"
AAD_UNLOCK_KEY = b"shoal/unlock-key"
AAD_NEXT_CA_KEY = b"shoal/ca-key/next"  # the new root's key during a CA rotation
UNLOCK_PREFIX = "SHOALKEY-1-"
_UNLOCK_RE = re.compile(r"^SHOALKEY-1-([A-Za-z0-9_-]{43})$")


def key_id(key: bytes) -> str:
    """A short public id of a managers' key (which key sealed the state)."""
    return hashlib.sha256(b"shoal/managers-key-id" + key).hexdigest()[:16]


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


# ------------------------------------------------------------------------ autolock

def new_unlock_key() -> str:
    """A fresh unlock key, as shown to the user: ``SHOALKEY-1-`` + 43 base64url characters."""
    return UNLOCK_PREFIX + base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip("=")


def parse_unlock_key(text: str) -> bytes:
    """The 32 bytes of an unlock key; SealError naming the expected form if malformed."""
    m = _UNLOCK_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise SealError("malformed unlock key: expected SHOALKEY-1-<43 characters>, as "
                        "printed by `shoal unlock-key`")
    return base64.urlsafe_b64decode(m.group(1) + "=")


def _derive(unlock_key: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=b"shoal/autolock",
                info=purpose).derive(parse_unlock_key(unlock_key))


def kek(unlock_key: str) -> bytes:
    """The key-encryption key an unlock key stands for."""
    return _derive(unlock_key, b"kek")


def _wrap_aad(node_id: str) -> bytes:
    return b"shoal/autolock/node-keys/" + node_id.encode()


def wrap_keys(unlock_key: str, node_id: str, keys: dict[str, str]) -> str:
    """``keys`` (name -> text) sealed under the unlock key's KEK, bound to ``node_id``."""
    return seal_text(kek(unlock_key), json.dumps(keys, sort_keys=True), _wrap_aad(node_id))


def unwrap_keys(unlock_key: str, node_id: str, wrapped: str) -> dict[str, str]:
    """The keys ``wrap_keys`` sealed; SealError if the unlock key is wrong (nothing else
    tells a wrong key from a damaged file: both fail the AES-GCM tag)."""
    try:
        text = unseal_text(kek(unlock_key), wrapped, _wrap_aad(node_id))
    except SealError:
        raise SealError("this unlock key does not open this node's keys (wrong key, or "
                        "an older one: a manager that was down during `unlock-key --rotate` "
                        "still takes the key from before)") from None
    data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SealError("the wrapped keys are malformed")
    return data


def derive_gossip_key(raft_password: str) -> bytes:
    """A 32-byte gossip key for identities written before keys were delivered on join."""
    return hashlib.sha256(b"shoal gossip key\0" + raft_password.encode()).digest()


__all__ = [
    "AAD_CA_KEY",
    "AAD_NEXT_CA_KEY",
    "AAD_UNLOCK_KEY",
    "SealError",
    "derive_gossip_key",
    "kek",
    "key_id",
    "new_key",
    "new_unlock_key",
    "parse_unlock_key",
    "seal",
    "seal_text",
    "secret_aad",
    "token_aad",
    "unseal",
    "unseal_text",
    "unwrap_keys",
    "wrap_keys",
]
