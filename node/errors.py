"""The node's errors, and the one place that turns any domain error into an HTTP reply.

Owns: the node package's error tree (below) and :func:`http_error`, the mapping of every error
class of shoal (node, raft, runtime, gossip, lb) to an HTTP status and a stable ``code``.
Must not touch: request handling (node/api.py calls :func:`http_error`), the CLI.

The tree (HTTP status where the API answers with it)::

    NodeError                  base of everything shoal.node raises on purpose
    ├── ApiError (status, code, message, field)  a request's error, 500 "internal" if raw
    │   ├── NotInCluster     409 this node has not run init/join
    │   ├── AlreadyInCluster 409
    │   ├── NotManager       403 cluster commands must run on a manager
    │   ├── NotFound         404 unknown service / node / task
    │   ├── BadRequest       400 invalid input (names the field)
    │   ├── Conflict         409 a name exists already / the object changed meanwhile
    │   ├── Forbidden        403 wrong join token; a certificate whose role may not do this
    │   │   └── CaMismatch   403 the manager's CA is not the one the join token pins
    │   ├── Unauthenticated  401 no client certificate of this cluster, or one of a node that
    │   │                        is no longer a member (removed: that is how revocation works)
    │   ├── TooManyRequests  429 a client over its request limits (shoal.node.limits); the
    │   │                        reply says when to retry (Retry-After)
    │   └── Unavailable      503 no leader / no quorum / timed out
    │       └── KeyRotationFailed 503 a gossip key rotation phase did not complete on every
    │                             node (the cluster is left in a safe state; retry)
    ├── PeerError            another node answered our request with an error (its status and
    │                        code are kept), or could not be reached (503)
    ├── TaskInputError       409 what a task needs besides its spec (a secret, a config, its
    │   │                        image from a peer) does not exist: the task is rejected
    │   └── TaskInputUnavailable 503 ... cannot be had yet (no manager/peer reachable): retried
    ├── InitFailed           409 a pod's init container exited non-zero or could not start
    │                            (node/pod.py): the task FAILED (never reaches the API)
    ├── FeedError            503 a manager's reply is not a well-formed feed message
    ├── NetworkError         503 the task network could not be set up (netlink, setns, no
    │   │                        free address); the lower-level error is chained
    │   └── MeshError        503 the mesh is not started / this node has no subnet yet
    ├── BackwardsTransition (AssertionError)  500 the worker's step function would report an
    │                        older status than the task's: a bug (never reaches the API)
    ├── PkiError (ValueError)    400 a certificate, key or request is malformed or does not verify
    ├── TokenError (ValueError)  400 a join token is malformed
    └── SealError (ValueError)   500 a sealed blob is malformed, or was sealed under another key
                                     or for another slot (always translated before the API)

Store errors (shoal.raft.errors) are translated by :func:`from_store_error`. The API
serialises every error as ``{"error": {"code", "message", "field"}}`` (:func:`http_error`):
4xx for a user's mistake, 409 for a conflict with the cluster's state, 503 for what a retry
may fix; 500 only for the classes declared in ``INTERNAL`` and for unknown exceptions — a bug.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from shoal.gossip import errors as _g
from shoal.lb import errors as _l
from shoal.raft import errors as raft_errors
from shoal.raft.errors import CommandRejected, StoreError, ValidationError, WriteTimeout
from shoal.runtime import errors as _r


class NodeError(Exception):
    """Base of every error shoal.node raises on purpose."""


class BackwardsTransition(NodeError, AssertionError):
    """A worker step would report a status older than the task's: a bug in ``next_step``."""


class ApiError(NodeError):
    status = 500
    code = "internal"

    def __init__(self, message: str, field: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class NotInCluster(ApiError):
    status, code = 409, "not_in_cluster"


class AlreadyInCluster(ApiError):
    status, code = 409, "already_in_cluster"


class NotManager(ApiError):
    status, code = 403, "not_manager"


class NotFound(ApiError):
    status, code = 404, "not_found"


class BadRequest(ApiError):
    status, code = 400, "invalid"


class Conflict(ApiError):
    status, code = 409, "conflict"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class CaMismatch(Forbidden):
    code = "ca_mismatch"


class Unauthenticated(ApiError):
    status, code = 401, "unauthenticated"


class TooManyRequests(ApiError):
    """A client over its in-flight or rate limit; ``retry_after``: seconds to wait."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class KeyRotationFailed(Unavailable):
    """A rotation phase did not complete on every node (the cluster is left in a safe state)."""

    code = "key_rotation_failed"


def from_reply(status: int, error: object) -> ApiError:
    """The typed error for another node's ``{"error": {...}}`` reply (code → class)."""
    e = error if isinstance(error, dict) else {}
    code = str(e.get("code", "internal"))
    classes: dict[str, type[ApiError]] = {
        c.code: c for c in (NotInCluster, AlreadyInCluster, NotManager, NotFound, BadRequest,
                            Conflict, Forbidden, CaMismatch, Unauthenticated, Unavailable)}
    err = classes.get(code, ApiError)(str(e.get("message", "refused")), str(e.get("field", "")),
                                      code=code)
    err.status = status
    return err


def from_store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, ValidationError):
        return BadRequest(exc.message, exc.field)
    if isinstance(exc, CommandRejected):
        cls: type[ApiError] = {
            "not_found": NotFound, "exists": Conflict, "conflict": Conflict,
            "invalid": BadRequest, "forbidden": Forbidden,
        }.get(exc.code, Conflict)
        return cls(exc.message, exc.field, code=exc.code)
    if isinstance(exc, WriteTimeout):
        return Unavailable(exc.message)
    return Unavailable(str(exc))


class PeerError(NodeError):
    """Another node answered a request with an error (``status``, ``code``, ``message``,
    ``field`` as it sent them), or could not be reached (503, "unavailable")."""

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


class TaskInputError(NodeError):
    """What a task needs besides its spec (a secret, a config, its image) does not exist."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message, self.field = message, field


class TaskInputUnavailable(TaskInputError):
    """What a task needs cannot be had yet (no manager or peer reachable): retry later."""


class InitFailed(NodeError):
    """A pod's init container exited non-zero or could not start (node/pod.py): the task
    fails, and its restart policy applies."""


class FeedError(NodeError):
    """A manager's reply that is not a well-formed feed message."""


class NetworkError(NodeError):
    """The node's task network could not be set up or changed."""


class MeshError(NetworkError):
    """The mesh cannot do that yet (not started, or this node has no subnet)."""


class PkiError(NodeError, ValueError):
    """A certificate, key or request is malformed or does not verify."""


class TokenError(NodeError, ValueError):
    """A join token is malformed."""


class SealError(NodeError, ValueError):
    """Malformed blob, wrong key, or sealed for another slot."""


_Call = TypeVar("_Call", bound=Callable[..., Awaitable[Any]])


def peer_call(call: _Call) -> _Call:
    """``call`` (a request to another node that raises the ApiError the peer answered, or
    Unavailable) raising PeerError instead: for components that talk to peers but must not
    deal in the API's own error classes."""

    @functools.wraps(call)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except ApiError as exc:
            raise PeerError(exc.status, exc.code, exc.message, exc.field) from exc

    return cast(_Call, wrapped)


def task_input(call: _Call) -> _Call:
    """``call`` (a provider of a task's inputs: its secrets and configs, its image from a
    peer; raising ApiErrors) raising TaskInputUnavailable (for Unavailable: retry) or
    TaskInputError (the input does not exist: reject) instead."""

    @functools.wraps(call)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except Unavailable as exc:
            raise TaskInputUnavailable(exc.message, exc.field) from exc
        except ApiError as exc:
            raise TaskInputError(exc.message, exc.field) from exc

    return cast(_Call, wrapped)


# ------------------------------------------------------------------------ errors → HTTP
#: (status, code) of each domain error class that is not an ApiError (those carry their own).
#: Looked up along the class's MRO: the nearest class listed decides. Every error class of
#: shoal is listed here or in INTERNAL (tests/test_errors.py checks it).
HTTP_STATUS: dict[type[BaseException], tuple[int, str]] = {
    # node
    PeerError: (503, "unavailable"),  # the instance's own status wins, see http_error
    TaskInputError: (409, "task_input"),
    TaskInputUnavailable: (503, "unavailable"),
    InitFailed: (409, "init_failed"),
    FeedError: (503, "unavailable"),
    NetworkError: (503, "network"),
    MeshError: (503, "network"),
    PkiError: (400, "invalid_certificate"),
    TokenError: (400, "invalid_token"),
    # raft (StoreError and its subclasses go through from_store_error)
    StoreError: (503, "unavailable"),
    ValidationError: (400, "invalid"),
    raft_errors.SpecError: (400, "invalid"),
    CommandRejected: (409, "conflict"),
    WriteTimeout: (503, "unavailable"),
    raft_errors.NotReady: (503, "unavailable"),
    raft_errors.IpamError: (503, "no_address"),
    raft_errors.WireError: (400, "invalid_encoding"),
    # runtime
    _r.StartError: (400, "cannot_start"),
    _r.InvalidTaskConfig: (400, "invalid"),
    _r.VolumeOptionError: (400, "invalid"),
    _r.VolumeMountFailed: (503, "launch_failed"),
    _r.TaskExists: (409, "exists"),
    _r.LaunchFailed: (503, "launch_failed"),
    _r.CgroupError: (400, "cannot_enforce_limits"),
    _r.SeccompError: (503, "seccomp_unavailable"),
    _r.ImageUnavailable: (404, "image_not_found"),
    _r.TaskNotFound: (404, "not_found"),
    _r.StopFailed: (503, "stop_failed"),
    _r.VolumeInUse: (409, "in_use"),
    _r.ImageError: (400, "image"),
    _r.ImageNotFound: (404, "image_not_found"),
    _r.InvalidImage: (400, "invalid_image"),
    _r.DigestMismatch: (400, "digest_mismatch"),
    _r.InvalidReference: (400, "invalid_reference"),
    _r.RegistryError: (400, "registry"),  # (an answer the registry gave: 4xx of its own)
    _r.RegistryUnreachable: (503, "registry_unreachable"),
    _r.RegistryAuthError: (403, "registry_auth"),
    _r.ManifestUnknown: (404, "manifest_unknown"),
    _r.UnsupportedImage: (400, "unsupported_image"),
    _r.ImageInUse: (409, "in_use"),
    _r.BuildError: (400, "build_failed"),
    # gossip
    _g.KeyringError: (400, "invalid_key"),
    _g.TransportError: (503, "unavailable"),
    _g.FrameTooLarge: (503, "unavailable"),
    _g.JoinError: (503, "unavailable"),
    # lb
    _l.InvalidService: (400, "invalid_service"),
    _l.FrontendError: (409, "frontend"),
    _l.PortConflict: (409, "port_conflict"),
    _l.PortInUse: (409, "port_in_use"),
    _l.AddressNotAvailable: (400, "address_not_available"),
    _l.PortPermissionDenied: (400, "port_permission_denied"),
    _l.BalancerUnavailable: (503, "balancer_unavailable"),
}

#: Errors that reaching the API means a bug (a base never raised itself, an error always
#: translated before a request could see it, the agent's own configuration, a test tool):
#: 500 on purpose.
INTERNAL: frozenset[type[BaseException]] = frozenset({
    NodeError, ApiError, SealError, BackwardsTransition,
    raft_errors.RaftError, raft_errors.PersistenceError, raft_errors.Rejected,
    _r.RuntimeError_, _r.ConfigError,
    _g.GossipError, _g.ConfigError, _g.WireError, _g.StateError, _g.SimulationStalled,
    _l.LBError, _l.ConfigError, _l.ProtocolError, _l.WireError, _l.WorkerGone,
})  # fmt: skip


def http_error(exc: BaseException) -> tuple[int, str, str, str]:
    """``(status, code, message, field)`` of the API's reply for ``exc``: the one mapping of
    errors to HTTP. An exception of no known class is a bug: 500 "internal"."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.field
    if isinstance(exc, PeerError):
        return exc.status, exc.code, exc.message, exc.field
    if isinstance(exc, StoreError) and not isinstance(exc, raft_errors.Rejected):
        api = from_store_error(exc)
        return api.status, api.code, api.message, api.field
    for cls in type(exc).__mro__:
        if cls in INTERNAL:
            break
        known = HTTP_STATUS.get(cls)
        if known is not None:
            field = getattr(exc, "field", "")
            message = getattr(exc, "message", None)
            return (known[0], known[1], message if isinstance(message, str) else str(exc),
                    field if isinstance(field, str) else "")
    return 500, "internal", f"internal error: {exc}", ""
