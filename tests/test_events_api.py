"""GET /v1/events and GET /metrics on a started ApiServer (unix socket, one manager on the
in-memory store, wired like the agent), read with a real HTTP client: NDJSON and SSE framing,
cursors, filters, gaps, the metrics text format parsed by prometheus-client's own parser,
and the `shoal events` output forms. No root, no network.

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from test_openapi import make_server

from shoal.cli.main import event_line, render_template
from shoal.node.api import ApiServer
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.raft.models import Node, NodeRole, TaskState, to_dict

ADDR = "10.0.0.1"


async def boot(ctx: Any) -> None:
    await ctx.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                       "worker_secret": "", "manager_secret": "", "digest": ""})
    await ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="n1", hostname="h1", addr=ADDR, api_port=2377, raft_port=2378,
        role=NodeRole.MANAGER, memory_bytes=1 << 33, cpus=4.0))})


def session(server: ApiServer) -> aiohttp.ClientSession:
    conn = aiohttp.UnixConnector(path=str(server.config.socket_path))
    return aiohttp.ClientSession(connector=conn)


async def read_lines(resp: aiohttp.ClientResponse, n: int) -> list[dict[str, Any]]:
    out = []
    while len(out) < n:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line, "stream ended early"
        out.append(json.loads(line))
    return out


async def test_ndjson_stream_resumes_from_a_cursor_and_filters(tmp_path: Path) -> None:
    """A client that reads some events, disconnects and reconnects with its last cursor gets
    exactly the rest; filters select by type and service; `until` ends the stream."""
    server, _store, ctx = make_server(tmp_path)
    await boot(ctx)
    await server.start()
    try:
        async with session(server) as http:
            async with http.get("http://shoal/v1/events?since=0-0") as resp:
                assert resp.status == 200
                assert resp.content_type == "application/x-ndjson"
                first = await read_lines(resp, 1)
            assert (first[0]["type"], first[0]["action"], first[0]["name"]) == \
                ("node", "join", "h1")
            for name in ("a", "b", "c"):
                async with http.post("http://shoal/v1/services", json={"spec": {
                        "name": name, "task": {"container": {"command": ["sleep", "9"]}}}}
                ) as r:
                    assert r.status == 200
            cursor = first[0]["cursor"]
            async with http.get(f"http://shoal/v1/events?since={cursor}") as resp:
                rest = await read_lines(resp, 3)
            assert [(e["type"], e["action"], e["name"]) for e in rest] == [
                ("service", "create", "a"), ("service", "create", "b"),
                ("service", "create", "c")]
            last = rest[-1]["cursor"]
            q = f"since=0-0&until={last}&filter=type%3Dservice&filter=service%3Db"
            async with http.get(f"http://shoal/v1/events?{q}") as resp:
                body = await asyncio.wait_for(resp.text(), 5)  # ends by itself (until)
            assert [json.loads(x)["name"] for x in body.splitlines()] == ["b"]
            async with http.get("http://shoal/v1/events?filter=colour%3Dred") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["field"] == "filter"
            async with http.get("http://shoal/v1/events?since=yesterday") as resp:
                assert resp.status == 400
    finally:
        await server.stop()


async def test_server_sent_events_carry_the_cursor_as_id_and_last_event_id_resumes(
        tmp_path: Path) -> None:
    server, _store, ctx = make_server(tmp_path)
    await boot(ctx)
    await server.start()
    try:
        async with session(server) as http:
            headers = {"Accept": "text/event-stream"}
            async with http.get("http://shoal/v1/events?since=0-0", headers=headers) as resp:
                assert resp.content_type == "text/event-stream"
                lines = [(await asyncio.wait_for(resp.content.readline(), 5)).decode()
                         for _ in range(4)]
            assert lines[0].startswith("id: ") and lines[1] == "event: node\n"
            rec = json.loads(lines[2][len("data: "):])
            assert lines[0] == f"id: {rec['cursor']}\n" and lines[3] == "\n"
            await ctx.propose({"op": "secret_create", "id": "x1", "name": "pw", "data": b"v",
                               "now": 5.0})
            async with http.get("http://shoal/v1/events", headers={
                    **headers, "Last-Event-ID": rec["cursor"]}) as resp:
                lines = [(await asyncio.wait_for(resp.content.readline(), 5)).decode()
                         for _ in range(3)]
            assert lines[1] == "event: secret\n"
            assert json.loads(lines[2][len("data: "):])["name"] == "pw"
    finally:
        await server.stop()


async def test_a_live_stream_sees_a_service_created_after_it_opened(tmp_path: Path) -> None:
    server, _store, ctx = make_server(tmp_path)
    await boot(ctx)
    await server.start()
    try:
        async with session(server) as http, http.get("http://shoal/v1/events") as resp:
            assert resp.status == 200  # headers arrive before any event
            await ctx.propose({"op": "service_create", "id": "s1", "now": 5.0, "spec": {
                "name": "web", "task": {"container": {"command": ["sleep", "9"]}}}})
            [ev] = await read_lines(resp, 1)
            assert (ev["type"], ev["action"], ev["name"]) == ("service", "create", "web")
    finally:
        await server.stop()


async def test_metrics_parse_with_the_prometheus_parser_and_count_tasks_and_start_latency(
        tmp_path: Path) -> None:
    """/metrics is the Prometheus text format: prometheus-client's parser reads it; it has
    the tasks by state, the start-latency histogram fed by the RUNNING events, the state
    index, and API request durations by route template and status."""
    server, store, ctx = make_server(tmp_path)
    await boot(ctx)
    await server.start()
    try:
        async with session(server) as http:
            async with http.post("http://shoal/v1/services", json={"spec": {
                    "name": "web", "mode": {"replicas": 2},
                    "task": {"container": {"command": ["sleep", "9"]}}}}) as r:
                assert r.status == 200
            leader = LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event())
            await leader.one_pass()
            for t in store.snapshot().tasks.values():
                await ctx.propose({"op": "task_status", "task_id": t.id, "node_id": "n1",
                                   "now": t.created_at + 0.03, "status": {
                                       "state": int(TaskState.RUNNING),
                                       "timestamp": t.created_at + 0.03}})
            async with http.get("http://shoal/v1/services/nope") as r:
                assert r.status == 404
            async with http.get("http://shoal/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
    finally:
        await server.stop()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    tasks = {s.labels["state"]: s.value for s in fams["shoal_tasks"].samples}
    assert tasks["running"] == 2 and tasks["assigned"] == 0
    hist = {(s.name, s.labels.get("le")): s.value
            for s in fams["shoal_task_start_latency_seconds"].samples}
    assert hist[("shoal_task_start_latency_seconds_count", None)] == 2
    assert hist[("shoal_task_start_latency_seconds_bucket", "0.025")] == 0
    assert hist[("shoal_task_start_latency_seconds_bucket", "0.05")] == 2
    assert fams["shoal_state_index"].samples[0].value == store.index
    api = {(s.labels["route"], s.labels["method"], s.labels["status"])
           for s in fams["shoal_api_request_duration_seconds"].samples}
    assert ("/v1/services", "POST", "200") in api
    assert ("/v1/services/{ref}", "GET", "404") in api
    events = {s.labels["type"]: s.value for s in fams["shoal_events"].samples
              if s.name == "shoal_events_total"}
    assert events["task"] >= 6 and events["service"] == 1


def test_shoal_events_prints_docker_style_lines_and_templates() -> None:
    rec = {"cursor": "7-1", "index": 7, "time": 1796392800.5, "type": "task",
           "action": "running", "id": "abc", "name": "web.1",
           "attributes": {"service": "web", "node": "n1", "exit_code": None}}
    assert event_line(rec) == ("2026-12-04T14:00:00.500000Z task running abc "
                               "(name=web.1, service=web, node=n1)")
    assert render_template("{{.Type}} {{.Action}} {{.Name}} {{.Attributes.service}} "
                           "{{.Cursor}}", rec) == "task running web.1 web 7-1"
    assert json.loads(render_template("{{json .}}", rec)) == rec
    assert render_template("{{json .Attributes}}", rec) == json.dumps(rec["attributes"])
    assert render_template("{{.Nope}}", rec) == "<no value>"
