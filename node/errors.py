"""Errors the agent's API returns to users and peers.

    ApiError (status, code, message, field)
    ├── NotInCluster     409 this node has not run init/join
    ├── AlreadyInCluster 409
    ├── NotManager       403 cluster commands must run on a manager
    ├── NotFound         404 unknown service / node / task
    ├── BadRequest       400 invalid input (names the field)
    ├── Forbidden        403 wrong join token; a certificate whose role may not do this
    │   └── CaMismatch   403 the manager's CA is not the one the join token pins
    ├── Unauthenticated  401 no client certificate of this cluster, or one of a node that
    │                        is no longer a member (removed: that is how revocation works)
    └── Unavailable      503 no leader / no quorum / timed out

Store errors (shoal.raft.errors) are translated by :func:`from_store_error`. The API
serialises every ApiError as ``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

from shoal.raft.errors import CommandRejected, StoreError, ValidationError, WriteTimeout


class ApiError(Exception):
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


class Unavailable(ApiError):
    status, code = 503, "unavailable"


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
