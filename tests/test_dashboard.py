"""The dashboard's sessions, CSRF tokens, login limits and role checks, on its real aiohttp
app over HTTP, with users in an in-memory store (the same ClusterState state machine). The
same in a real browser on netns hosts: tests/test_dashboard_cluster.py."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shoal.node import users as users_mod
from shoal.node.api import Guard, guarded
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.nodes import Nodes
from shoal.node.control.services import Services
from shoal.node.dashboard import COOKIE, Dashboard
from shoal.node.execs import _who
from shoal.node.source import MemoryStore
from shoal.node.users import Users

ADDR = "10.0.0.1"


def _api(guard: Guard) -> web.Application:
    """Two routes of the API, guarded like shoal.node.api guards them all."""
    app = web.Application()

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/v1/services", guarded(ok, "service_ls", guard))
    async def who(req: web.Request) -> web.Response:  # (exec's audit line names the user)
        return web.json_response({"who": _who(req)})

    app.router.add_get("/v1/tasks/{ref}/exec", guarded(who, "task_exec", guard))
    app.router.add_post("/v1/services/{ref}/scale", guarded(ok, "service_scale", guard))
    return app


@pytest.fixture
async def dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[tuple[TestClient[Any, Any], Users]]:
    monkeypatch.setattr(users_mod, "SCRYPT_N", 1 << 10)  # cheap hashes for this test only
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    ctx = NodeContext(AgentConfig(data_dir=tmp_path, advertise_addr=ADDR), "h1")
    ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager", raft_password="",
                         voters=[f"{ADDR}:2378"], manager_key=os.urandom(32)), store, store)
    users = Users(ctx)
    await users.add({"name": "olga", "role": "operator", "password": "operator-pw"})
    await users.add({"name": "vic", "role": "viewer", "password": "viewer-pw-1"})
    app = Dashboard(users, cast(Services, None), cast(Nodes, None), _api).app()
    async with TestClient(TestServer(app)) as client:
        yield client, users


async def _login(client: TestClient[Any, Any], user: str, pw: str) -> Any:
    return await client.post("/login", json={"user": user, "password": pw})


async def test_login_sets_a_strict_httponly_cookie_and_changes_need_the_sessions_csrf_token(
        dash: tuple[TestClient[Any, Any], Users]) -> None:
    client, _users = dash
    assert (await client.get("/api/v1/services")).status == 401  # not logged in
    resp = await _login(client, "olga", "operator-pw")
    assert resp.status == 200
    who = await resp.json()
    assert who["user"] == "olga" and who["role"] == "operator" and len(who["csrf"]) > 20
    cookie = resp.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure when served over TLS
    assert (await client.get("/api/v1/services")).status == 200
    no_csrf = await client.post("/api/v1/services/web/scale", json={"replicas": 2})
    assert no_csrf.status == 403 and (await no_csrf.json())["error"]["field"] == "csrf"
    wrong = await client.post("/api/v1/services/web/scale", json={"replicas": 2},
                              headers={"X-CSRF-Token": "guessed"})
    assert wrong.status == 403
    ok = await client.post("/api/v1/services/web/scale", json={"replicas": 2},
                           headers={"X-CSRF-Token": who["csrf"]})
    assert ok.status == 200
    # logging out needs the token too, and ends the session
    assert (await client.post("/logout")).status == 403
    assert (await client.post("/logout", headers={"X-CSRF-Token": who["csrf"]})).status == 200
    assert (await client.get("/api/v1/services")).status == 401


async def test_a_role_or_password_change_applies_to_the_next_request(
        dash: tuple[TestClient[Any, Any], Users]) -> None:
    client, users = dash
    csrf = (await (await _login(client, "vic", "viewer-pw-1")).json())["csrf"]
    hdr = {"X-CSRF-Token": csrf}
    refused = await client.post("/api/v1/services/web/scale", json={}, headers=hdr)
    assert refused.status == 403
    assert "needs the operator role" in (await refused.json())["error"]["message"]
    await users.update("vic", {"role": "operator"})
    assert (await client.post("/api/v1/services/web/scale", json={}, headers=hdr)).status == 200
    await users.update("vic", {"password": "a-new-password"})
    assert (await client.get("/session")).status == 401  # the old session ended


async def test_bearer_tokens_act_as_their_user_without_a_session(
        dash: tuple[TestClient[Any, Any], Users]) -> None:
    client, users = dash
    token = (await users.new_token("vic"))["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/services", headers=auth)).status == 200
    assert (await client.post("/api/v1/services/web/scale", json={},
                              headers=auth)).status == 403
    forged = {"Authorization": "Bearer shoal_not-a-token"}
    assert (await client.get("/api/v1/services", headers=forged)).status == 401
    await users.new_token("vic")  # replaces the old one
    assert (await client.get("/api/v1/services", headers=auth)).status == 401


async def test_wrong_passwords_are_refused_logged_and_then_rate_limited(
        dash: tuple[TestClient[Any, Any], Users], caplog: pytest.LogCaptureFixture) -> None:
    client, _users = dash
    caplog.set_level(logging.WARNING, "shoal.dashboard")
    unknown = await _login(client, "nobody", "whatever-pw")
    assert unknown.status == 401
    statuses = [(await _login(client, "olga", "wrong-password")).status for _ in range(5)]
    assert statuses == [401, 401, 401, 401, 429]  # 5 failures from this client in total
    limited = await _login(client, "olga", "operator-pw")  # right, but still limited
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "failed dashboard login for user 'olga'" in caplog.text
    assert "wrong-password" not in caplog.text
    form = await client.post("/login", data={"user": "olga", "password": "operator-pw"})
    assert form.status == 400  # a cross-site form cannot log anyone in


async def test_an_exec_with_a_session_needs_its_csrf_token_though_it_is_a_get(
        dash: tuple[TestClient[Any, Any], Users]) -> None:
    """The exec WebSocket opens with a GET: with the session cookie alone (what a page of any
    service published on the manager's address would send, same site) it is refused."""
    client, _users = dash
    who = await (await _login(client, "olga", "operator-pw")).json()
    bare = await client.get("/api/v1/tasks/web.1/exec", headers={"Origin": "http://x:8080"})
    assert bare.status == 403 and (await bare.json())["error"]["field"] == "csrf"
    ok = await client.get("/api/v1/tasks/web.1/exec", headers={"X-CSRF-Token": who["csrf"]})
    assert ok.status == 200 and (await ok.json())["who"] == "user 'olga' (the dashboard)"
    assert (await client.get("/api/v1/services")).status == 200  # (other GETs need none)
