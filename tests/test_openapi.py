"""The OpenAPI description (node/openapi.py) against what the agent really serves.

No root, no network besides a unix socket in the test's directory: the ApiServer runs on
the in-memory store (node/source.py MemoryStore) with the command modules wired as the agent
wires them (see tests/test_control_unit.py). Each test names the property it checks.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator

from shoal.node import openapi
from shoal.node.api import ApiServer, Controls, register
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext, VoterChanges
from shoal.node.control.admission import Admission
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.events import Events
from shoal.node.control.nodes import Nodes
from shoal.node.control.roles import Roles
from shoal.node.control.services import Services
from shoal.node.events import EventLog
from shoal.node.membership import GossipControl
from shoal.node.metrics import Metrics, Sources
from shoal.node.netapi import NetworksApi
from shoal.node.pki import CertInfo
from shoal.node.registries import Registries
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.node.transfer import Transfer
from shoal.raft import spec
from shoal.raft.models import Node, NodeRole, to_dict
from shoal.runtime.images import ImageStore
from shoal.runtime.registry import RegistryConfig
from shoal.runtime.testing import FakeController

ADDR = "127.0.0.1"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
METHODS = ("get", "post", "put", "delete", "patch")


class Membership:
    """This node's lifecycle as the routes see it; the tests here never init/join/leave."""

    def info(self) -> dict[str, Any]:
        return {"hostname": "h1", "addr": ADDR, "member": True}

    async def init(self, cluster_cidr: str = "") -> dict[str, Any]:
        raise AssertionError("not used")

    async def join(self, token: str, remote: str) -> dict[str, Any]:
        raise AssertionError("not used")

    async def leave(self, force: bool) -> dict[str, Any]:
        raise AssertionError("not used")

    async def role_changed(self, peer: CertInfo | None, role: Any) -> dict[str, Any]:
        raise AssertionError("not used")


def make_server(tmp_path: Path) -> tuple[ApiServer, MemoryStore, NodeContext]:
    """An ApiServer of a one-manager cluster on the in-memory store, wired like the agent."""
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    config = AgentConfig(data_dir=tmp_path, advertise_addr=ADDR, api_port=0)
    ctx = NodeContext(config, "h1")
    ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager", raft_password="",
                         voters=[f"{ADDR}:2378"]), store, store)
    runtime = FakeController()
    images = ImageStore(tmp_path / "img")
    security = Security(ctx)
    gossip = GossipControl(ctx, security, lambda: None)
    transfer = Transfer(ctx, security, runtime, images)
    voters = VoterChanges(config.join_timeout)
    event_log = EventLog()
    event_log.attach(store)
    metrics = Metrics(Sources(store=lambda: ctx.store, runtime=runtime, gossip=lambda: None,
                              balancer=lambda: None, events=event_log))
    controls = Controls(
        lifecycle=Membership(), services=Services(ctx, transfer),
        nodes=Nodes(ctx, gossip, voters), roles=Roles(ctx, security, voters),
        admission=Admission(ctx, security, gossip, voters),
        dispatcher=Dispatcher(ctx, security, lambda: None), security=security,
        secrets=SecretsApi(ctx, security), gossip=gossip, transfer=transfer, runtime=runtime,
        images=images, events=Events(ctx, event_log), metrics=metrics,
        registries=Registries(ctx, security, SecretsApi(ctx, security), RegistryConfig(),
                              images, transfer),
        networks=NetworksApi(ctx))
    return ApiServer(config, controls), store, ctx


def served(app: web.Application) -> set[tuple[str, str]]:
    """(method, canonical path) of every route of an aiohttp app; HEAD comes with GET."""
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


def described(doc: dict[str, Any], internal: bool | None = None) -> set[tuple[str, str]]:
    out = set()
    for path, item in doc["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            if internal is None or ("internal" in op["tags"]) == internal:
                out.add((method.upper(), path))
    return out


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, name = schema["$ref"].split("/")
        schema = doc["components"]["schemas"][name]
    return schema


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for a schema of the document ($refs into its components)."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


# --------------------------------------------------------------------------- routes

def test_every_route_served_is_described_and_every_described_route_is_served(
        tmp_path: Path) -> None:
    """The user routes (unix socket and remote API) are exactly the operations not tagged
    internal; the node-to-node routes exactly those tagged internal (method + path)."""
    server, _, _ = make_server(tmp_path)
    doc = openapi.openapi()
    local, remote, peer = server.local_app(), server.local_app(remote=True), server.peer_app()
    assert served(local) == described(doc, internal=False)
    assert served(remote) == served(local)
    assert served(peer) == described(doc, internal=True)
    assert ("GET", "/v1/openapi.json") in served(local)
    assert {"/v1/services/{ref}/logs", "/v1/cluster/report", "/v1/cluster/join",
            "/v1/cluster/images/blobs/{digest}"} <= set(doc["paths"])


def test_a_handler_without_a_route_or_a_route_without_a_handler_stops_the_server() -> None:
    """register() refuses a handler table that differs from the route table either way, so
    the router cannot serve an undescribed route nor describe an unserved one."""
    async def handler(_: web.Request) -> Any:
        return {}

    handlers = {r.op: handler for r in openapi.routes("peer")}
    register(web.Application(), "peer", handlers)
    with pytest.raises(RuntimeError, match="no handler for \\['cluster_usage'\\]"):
        register(web.Application(), "peer",
                 {k: v for k, v in handlers.items() if k != "cluster_usage"})
    with pytest.raises(RuntimeError, match="no route for \\['cluster_debug'\\]"):
        register(web.Application(), "peer", {**handlers, "cluster_debug": handler})


def test_every_operation_has_an_id_a_summary_path_parameters_and_error_replies() -> None:
    """Each operation is documented: unique operationId, summary, one parameter per path
    template variable, the shared error shape on every error status, 500 listed as a bug."""
    doc = openapi.openapi()
    ids = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            ids.append(op["operationId"])
            assert op["summary"]
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), (method, path)
            assert "200" in op["responses"] and "500" in op["responses"]
            for status, resp in op["responses"].items():
                if status != "200":
                    name = resp["$ref"].rsplit("/", 1)[1]
                    content = doc["components"]["responses"][name]["content"]
                    assert content["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}
    assert len(ids) == len(set(ids))
    logs = doc["paths"]["/v1/services/{ref}/logs"]["get"]
    assert {p["name"] for p in logs["parameters"] if p["in"] == "query"} == {
        "tail", "since", "timestamps", "follow", "container"}
    assert "application/x-ndjson" in logs["responses"]["200"]["content"]
    codes = doc["components"]["responses"]["Conflict"]["description"]
    assert "exists" in codes and "not_in_cluster" in codes
    assert "internal" in doc["paths"]["/v1/cluster/state"]["post"]["tags"]
    assert doc["paths"]["/v1/cluster/join"]["post"]["security"] == [{}]
    assert doc["paths"]["/v1/cluster/report"]["post"]["security"] == [{"nodeCertificate": []}]


# --------------------------------------------------------------------------- document

def test_the_description_is_a_valid_openapi_3_1_document() -> None:
    """openapi-spec-validator accepts it (schemas, $refs, and every declared default against
    its own schema); info.version is the installed package's version."""
    doc = openapi.openapi()
    assert doc["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(doc).validate()
    assert doc["info"]["version"] == metadata.version("shoal")


def test_the_service_spec_schema_is_raft_spec_declarations() -> None:
    """Every leaf field of raft/spec.py's ServiceSpec appears in the description with the
    declaration's help text and bounds (task.resources.limits.memory among them)."""
    doc = openapi.openapi()
    schemas = doc["components"]["schemas"]
    decls = list(spec.fields())
    assert len(decls) > 20
    for d in decls:
        node: dict[str, Any] = schemas["ServiceSpec"]
        for part in d.path.split("."):
            node = resolve(doc, node)["properties"][part]
        assert node["description"] == d.help, d.path
    limits = resolve(doc, resolve(doc, resolve(doc, schemas["ServiceSpec"])["properties"]["task"]
                                  )["properties"]["resources"])["properties"]["limits"]
    memory = resolve(doc, limits)["properties"]["memory"]
    assert memory["description"] == spec.by_path()["task.resources.limits.memory"].help
    assert memory["maximum"] == 1 << 50 and memory["minimum"] == 0
    # the scale route takes the spec's own declaration of replicas
    scale = schemas["ServiceScaleRequest"]["properties"]["replicas"]
    replicas = schemas["ServiceMode"]["properties"]["replicas"]
    assert {k: scale[k] for k in ("description", "minimum", "maximum")} == {
        k: replicas[k] for k in ("description", "minimum", "maximum")}
    assert replicas["maximum"] == spec.MAX_REPLICAS


# --------------------------------------------------------------------------- served

async def test_a_running_api_server_serves_its_description_and_validates_by_it(
        tmp_path: Path) -> None:
    """GET /v1/openapi.json on a started ApiServer's unix socket returns the document; a
    service spec the description's schema accepts is created, one it refuses (replicas
    over the declared maximum) is refused with the described error shape, naming the
    field."""
    server, store, ctx = make_server(tmp_path)
    await ctx.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                       "worker_secret": "", "manager_secret": "", "digest": ""})
    await ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="n1", hostname="h1", addr=ADDR, api_port=2377, raft_port=2378,
        role=NodeRole.MANAGER, memory_bytes=1 << 33, cpus=4.0))})
    await server.start()
    try:
        conn = aiohttp.UnixConnector(path=str(server.config.socket_path))
        async with aiohttp.ClientSession(connector=conn) as http:
            async with http.get("http://shoal/v1/openapi.json") as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                doc = await resp.json()
            assert doc == openapi.openapi()

            create = doc["paths"]["/v1/services"]["post"]
            body_schema = create["requestBody"]["content"]["application/json"]["schema"]
            good = {"spec": {"name": "web", "task": {"container": {"command": ["sleep", "9"]},
                                                     "resources": {"limits": {
                                                         "memory": 64 << 20}}},
                             "mode": {"replicas": 2}}}
            validator(doc, body_schema).validate(good)
            async with http.post("http://shoal/v1/services", json=good) as resp:
                assert resp.status == 200, await resp.text()
                reply = await resp.json()
            assert reply["name"] == "web"
            validator(doc, create["responses"]["200"]["content"]["application/json"]["schema"]
                      ).validate(reply)
            svc = store.snapshot().service_by_name("web")
            assert svc is not None and svc.spec.task.resources.limits.memory == 64 << 20

            bad = {"spec": {**good["spec"], "name": "api",
                            "mode": {"replicas": spec.MAX_REPLICAS + 1}}}
            assert not validator(doc, body_schema).is_valid(bad)
            async with http.post("http://shoal/v1/services", json=bad) as resp:
                assert resp.status == 400
                err = await resp.json()
            validator(doc, {"$ref": "#/components/schemas/Error"}).validate(err)
            assert err["error"]["code"] == "invalid"
            assert err["error"]["field"] == "mode.replicas"
    finally:
        await server.stop()


# --------------------------------------------------------------------------- docs

def test_docs_api_md_lists_every_described_route() -> None:
    """docs/api.md names every operation of the description as `METHOD /path`."""
    text = DOCS.read_text()
    listed = set(re.findall(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`?\s]*)", text))
    missing = described(openapi.openapi()) - listed
    assert not missing, f"docs/api.md does not list {sorted(missing)}"


def test_docs_api_md_route_tables_are_the_generated_ones() -> None:
    """The route tables in docs/api.md are what the route table generates today (fix:
    `python -m shoal.node.openapi --docs docs/api.md`)."""
    text = DOCS.read_text()
    assert openapi.render_docs(text) == text


def test_the_route_list_in_the_docs_follows_the_table() -> None:
    """routes_markdown has one row per route of its listener, bodies named by their fields."""
    local = openapi.routes_markdown("local")
    assert local.count("\n| `") == len(openapi.routes("local"))
    assert "| `POST /v1/services/{ref}/scale?version=…` | `{replicas, version}` |" in local
    peer = openapi.routes_markdown("peer")
    assert "| `POST /v1/cluster/heartbeat` | a member's, for its own node_id | `{node_id}` |" \
        in peer
    assert json.loads(openapi.openapi_json()) == openapi.openapi()
