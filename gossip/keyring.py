"""The cluster keyring: AES-GCM keys for gossip packets and streams.

Owns the set of installed keys and which one is primary; encrypts with the primary, decrypts by
trying every installed key (primary first), so keys rotate without downtime:

1. ``install_key(new)`` on every member (they can now read traffic under ``new``);
2. ``use_key(new)`` on every member (they now send under ``new``, still read the old key);
3. ``remove_key(old)`` on every member.

It knows nothing of packet framing (see wire.py) and does not distribute keys: the agent does
that (e.g. through the replicated store). Nonces are 96-bit random values from os.urandom.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DropReason, KeyringError, WireError

NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZES = (16, 24, 32)


def fingerprint(key: bytes) -> str:
    """A short public name for a key (16 hex digits of its SHA-256), safe to print and log."""
    return hashlib.sha256(b"shoal gossip key\0" + key).hexdigest()[:16]


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) not in KEY_SIZES:
        raise KeyringError("keys must be 16, 24 or 32 bytes (AES-128/192/256)")
    return bytes(key)


class Keyring:
    """Installed AES-GCM keys; the first is the primary (used to encrypt)."""

    __slots__ = ("_ciphers", "_keys")

    def __init__(self, primary: bytes, extra: tuple[bytes, ...] | list[bytes] = ()) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        self._add(_check_key(primary))
        for key in extra:
            self.install_key(key)

    def _add(self, key: bytes) -> None:
        if key not in self._ciphers:
            self._keys.append(key)
            self._ciphers[key] = AESGCM(key)

    @property
    def primary(self) -> bytes:
        """The key everything is encrypted with."""
        return self._keys[0]

    def keys(self) -> list[bytes]:
        """All installed keys, primary first."""
        return list(self._keys)

    def install_key(self, key: bytes) -> None:
        """Accept ``key`` for decryption (no-op if already installed)."""
        self._add(_check_key(key))

    def use_key(self, key: bytes) -> None:
        """Make an installed ``key`` the primary."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError("use_key: key is not installed (install_key first)")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove_key(self, key: bytes) -> None:
        """Stop accepting ``key``. The primary cannot be removed (use_key another first)."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError("remove_key: key is not installed")
        if key == self._keys[0]:
            raise KeyringError("remove_key: cannot remove the primary key (use_key another first)")
        self._keys.remove(key)
        del self._ciphers[key]

    def set_keys(self, keys: list[bytes]) -> bool:
        """Make the keyring exactly ``keys``, the first one primary (install, use, remove in
        the order that never leaves it without a primary); True if anything changed."""
        if not keys:
            raise KeyringError("set_keys: at least one key (the primary) is required")
        wanted = [_check_key(k) for k in keys]
        before = list(self._keys)
        for key in wanted:
            self._add(key)
        self.use_key(wanted[0])
        for key in list(self._keys):
            if key not in wanted:
                self.remove_key(key)
        return self._keys[0] != before[0] or set(self._keys) != set(before)

    def fingerprints(self) -> list[str]:
        """``fingerprint`` of every installed key, primary first."""
        return [fingerprint(k) for k in self._keys]

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce ‖ ciphertext ‖ tag`` under the primary key."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._ciphers[self._keys[0]].encrypt(nonce, plaintext, aad)

    def decrypt(self, data: bytes | memoryview, aad: bytes) -> bytes:
        """Open ``nonce ‖ ciphertext ‖ tag`` with the first key that authenticates it."""
        if len(data) < NONCE_SIZE + TAG_SIZE:
            raise WireError(DropReason.SHORT, "shorter than nonce + tag")
        nonce = bytes(data[:NONCE_SIZE])
        body = bytes(data[NONCE_SIZE:])
        for key in self._keys:
            try:
                return self._ciphers[key].decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise WireError(DropReason.DECRYPT, "no installed key authenticates the payload")
