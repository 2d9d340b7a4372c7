"""Every error class of shoal answers the API with a deliberate HTTP status (node/errors.py).

A user's mistake is a 4xx, a conflict with the cluster's state a 409, what a retry may fix a
503; a 500 means a bug: only the classes declared in ``INTERNAL`` and exceptions shoal does not
know give one. The walk imports every module of shoal and looks at every Exception subclass
defined in it, so a new error class fails here until it is given its status.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from shoal.gossip.errors import DropReason as GossipDrop
from shoal.gossip.errors import WireError as GossipWireError
from shoal.lb.errors import DropReason as LBDrop
from shoal.lb.errors import WireError as LBWireError
from shoal.node.api import error_middleware
from shoal.node.errors import (
    HTTP_STATUS,
    INTERNAL,
    ApiError,
    BadRequest,
    NotFound,
    PeerError,
    TaskInputError,
    TaskInputUnavailable,
    Unavailable,
    http_error,
    peer_call,
    task_input,
)
from shoal.raft.errors import ValidationError
from shoal.runtime.errors import (
    ImageNotFound,
    ImageUnavailable,
    InvalidImage,
    InvalidTaskConfig,
    LaunchFailed,
)

# Packages whose errors can reach the API. shoal.cli is above the API: its CliError is what
# the CLI makes of the API's replies, never something the agent raises.
API_PACKAGES = ("node", "raft", "gossip", "runtime", "lb")


def all_modules() -> list[str]:
    """Every module of shoal (``__main__`` modules run their program when imported: skipped)."""
    names = []
    for pkg in ("node", "raft", "gossip", "runtime", "lb", "cli"):
        mod = importlib.import_module(f"shoal.{pkg}")
        names.append(mod.__name__)
        names += [m.name for m in pkgutil.iter_modules(mod.__path__, mod.__name__ + ".")
                  if not m.name.endswith(".__main__")]
    return names


def subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


for _name in all_modules():
    importlib.import_module(_name)

ERRORS: list[type[BaseException]] = sorted(
    {c for c in subclasses(BaseException) if c.__module__.startswith("shoal.")},
    key=lambda c: f"{c.__module__}.{c.__qualname__}",
)
API_ERRORS = [c for c in ERRORS if c.__module__.split(".")[1] in API_PACKAGES]

# Constructors that need more than a message.
_ARGS: dict[type[BaseException], tuple[Any, ...]] = {
    GossipWireError: (GossipDrop.SHORT, "boom"),
    LBWireError: (LBDrop.SHAPE, "boom"),
    PeerError: (409, "conflict", "boom", "name"),
}


def instance(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` built the way its raisers build it."""
    if cls in _ARGS:
        return cls(*_ARGS[cls])
    for args in (("boom",), ("field", "boom"), ({},), ()):
        try:
            return cls(*args)
        except (TypeError, AttributeError):
            continue
    raise AssertionError(f"cannot build a {cls.__qualname__}: add it to _ARGS")


def name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_walk_finds_the_error_trees_of_every_package() -> None:
    # Guard against a walk that silently finds nothing (the tests below would pass vacuously).
    found = {c.__module__.split(".")[1] for c in ERRORS}
    assert found == {"node", "raft", "gossip", "runtime", "lb", "cli"}
    assert len(API_ERRORS) > 50


@pytest.mark.parametrize("cls", API_ERRORS, ids=name)
def test_every_error_class_has_a_declared_status(cls: type[BaseException]) -> None:
    # ApiErrors carry their status on the class; the others are listed in node/errors.py.
    assert issubclass(cls, ApiError) or cls in HTTP_STATUS or cls in INTERNAL, (
        f"{name(cls)}: give it an HTTP status in node/errors.py HTTP_STATUS (or declare it "
        "INTERNAL if reaching the API can only be a bug)"
    )


@pytest.mark.parametrize("cls", API_ERRORS, ids=name)
def test_only_declared_internal_errors_give_500(cls: type[BaseException]) -> None:
    status, code, message, field = http_error(instance(cls))
    if cls in INTERNAL:
        assert status == 500
    else:
        assert 400 <= status < 500 or status == 503, f"{name(cls)} gives {status}"
        assert code and code != "internal"
    assert message and isinstance(field, str)


def test_every_error_class_belongs_to_its_package_tree() -> None:
    # Each package draws its tree in its errors.py docstring: the classes live there too.
    outside = [name(c) for c in ERRORS if c.__module__.rsplit(".", 1)[1] != "errors"]
    assert outside == []


def test_an_unknown_exception_is_a_bug_500() -> None:
    assert http_error(KeyError("x")) == (500, "internal", "internal error: 'x'", "")
    assert http_error(RuntimeError("oops"))[0] == 500


def test_image_errors_are_the_users_mistakes() -> None:
    assert http_error(ImageNotFound("no image matches 'nope'"))[:2] == (404, "image_not_found")
    assert http_error(InvalidImage("layer.tar: absolute path /etc"))[:2] == (400, "invalid_image")
    assert http_error(ImageUnavailable("image 'x' is not on this node"))[0] == 404


def test_field_errors_keep_naming_the_field() -> None:
    assert http_error(InvalidTaskConfig("hostname", "not a valid host name: '-x'")) == (
        400, "invalid", "hostname: not a valid host name: '-x'", "hostname")
    assert http_error(ValidationError("replicas must be >= 0", "replicas")) == (
        400, "invalid", "replicas must be >= 0", "replicas")
    assert http_error(BadRequest("spec is required", "spec")) == (
        400, "invalid", "spec is required", "spec")


def test_retryable_and_peer_errors() -> None:
    assert http_error(Unavailable("no leader"))[:2] == (503, "unavailable")
    assert http_error(LaunchFailed("launcher not ready after 10s"))[0] == 503
    assert http_error(PeerError(404, "not_found", "no such service", "ref")) == (
        404, "not_found", "no such service", "ref")


async def test_the_api_answers_with_the_mapping() -> None:
    # node/api.py's middleware goes through http_error: an image error is a 4xx with its code.
    async def handler(_: web.Request) -> Any:
        raise InvalidImage("archive has no manifest.json")

    async def broken(_: web.Request) -> Any:
        raise ZeroDivisionError("division by zero")

    req = make_mocked_request("POST", "/v1/images/load")
    resp = await error_middleware(req, handler)
    assert isinstance(resp, web.Response) and resp.text is not None
    assert resp.status == 400
    assert json.loads(resp.text) == {"error": {
        "code": "invalid_image", "message": "archive has no manifest.json", "field": ""}}
    resp = await error_middleware(req, broken)
    assert isinstance(resp, web.Response) and resp.text is not None
    assert resp.status == 500
    assert json.loads(resp.text)["error"]["code"] == "internal"


async def test_a_tasks_missing_input_rejects_it_and_an_unreachable_one_waits() -> None:
    # The worker sees its inputs' providers (secrets, image pulls) through task_input: a
    # missing secret is TaskInputError (the task is rejected), no manager reachable is
    # TaskInputUnavailable (it waits), with the provider's message and field.
    async def missing(ref: str) -> None:
        raise NotFound(f"no such secret: {ref}", "secrets")

    async def unreachable(ref: str) -> None:
        raise Unavailable("cannot fetch the secrets of task t1: no manager known")

    async def fine(ref: str) -> str:
        return ref

    with pytest.raises(TaskInputError) as info:
        await task_input(missing)("db")
    assert type(info.value) is TaskInputError
    assert (info.value.message, info.value.field) == ("no such secret: db", "secrets")
    with pytest.raises(TaskInputUnavailable, match="no manager known"):
        await task_input(unreachable)("db")
    assert await task_input(fine)("db") == "db"


async def test_a_peers_refusal_keeps_its_status_code_and_field() -> None:
    async def refuse(addr: str) -> None:
        raise BadRequest("report for a task of another node", "task_id")

    with pytest.raises(PeerError) as info:
        await peer_call(refuse)("10.0.0.1:2377")
    err = info.value
    assert (err.status, err.code, err.message, err.field) == (
        400, "invalid", "report for a task of another node", "task_id")

