"""Join tokens: ``SHOAL-1-<CA digest>-<secret>``.

Owns: making, parsing and checking join tokens. The digest is the SHA-256 of the cluster
CA certificate (shoal.node.pki.ca_digest): a joining node pins it, refusing a manager
whose CA does not match (no trust on first use). The secret (128 random bits, hex)
differs between the worker and the manager token, which is how a manager tells the role
apart; both are kept sealed in the replicated state (shoal.node.sealing), so a worker's
replica cannot mint a manager token. Comparison is constant-time. Must not touch: the
network or the store.
"""

from __future__ import annotations

import hmac
import re
import secrets

from shoal.node.errors import TokenError

TOKEN_RE = re.compile(r"^SHOAL-1-([0-9a-f]{64})-([0-9a-f]{32})$")


def new_secret() -> str:
    return secrets.token_hex(16)  # 128 bits


def make_token(digest: str, secret: str) -> str:
    return f"SHOAL-1-{digest}-{secret}"


def parse_token(token: str) -> tuple[str, str]:
    m = TOKEN_RE.match(token.strip())
    if not m:
        raise TokenError("invalid join token format (expected SHOAL-1-<digest>-<secret>, "
                         "as printed by `shoal join-token worker|manager`)")
    return m.group(1), m.group(2)


def role_for(token: str, digest: str, worker_secret: str, manager_secret: str) -> str | None:
    """Return "worker" or "manager" if the token is valid for this cluster, else None."""
    try:
        tok_digest, secret = parse_token(token)
    except TokenError:
        return None
    digest_ok = hmac.compare_digest(tok_digest, digest)
    is_worker = hmac.compare_digest(secret, worker_secret)
    is_manager = hmac.compare_digest(secret, manager_secret)
    if not digest_ok:
        return None
    if is_manager:
        return "manager"
    if is_worker:
        return "worker"
    return None
