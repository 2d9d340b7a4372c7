"""The web dashboard and the users' roles on real agents in netns hosts, seen through a real
headless browser (Debian's chromium driven by Playwright; it never downloads a browser).

The browser runs inside h1's network namespace and opens the dashboard h1 serves on its own
loopback (``--dashboard-addr 127.0.0.1:8088``). Screenshots go to the test's temp dir, or to
``$SHOAL_DASHBOARD_SHOTS`` (``docs/img`` refreshes the ones the docs show).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DASH = "http://127.0.0.1:8088"
REMOTE_PORT = 2380
ADMIN_PW, VIEWER_PW = "correct horse battery", "viewer-secret-1"
SLEEP = ["--", "sleep", "100000"]

# Drives the page like a user: log in, watch, act; prints what it saw as one JSON object.
# (Predicates are functions, not expressions: the page's Content-Security-Policy forbids eval.)
BROWSER = r"""
import json, os, signal, sys
from playwright.sync_api import sync_playwright

chromium, base, admin_pw, viewer_pw, kill_pid, down_host, shots = sys.argv[1:8]
seen = {}

def text(page, sel):
    return page.eval_on_selector(sel, "e => e.textContent")

def wait_text(page, sel, want, timeout=60000):
    page.wait_for_function(
        "([s, w]) => { const e = document.querySelector(s); return e && e.textContent === w; }",
        arg=[sel, want], timeout=timeout)

def login(page, user, pw):
    page.fill("#login-user", user)
    page.fill("#login-password", pw)
    page.click("#login-submit")

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    try:
        page.goto(base + "/")
        page.wait_for_selector("#login-view:not([hidden])")
        login(page, "alice", admin_pw)
        page.wait_for_selector("#app-view:not([hidden])")
        page.evaluate("window.__noReload = 'same page'")  # lost if the page ever reloads
        page.wait_for_function("() => document.querySelectorAll('#nodes tbody tr').length === 3")
        wait_text(page, "tr[data-service=web] .replicas", "1/1")
        seen["nodes"] = page.eval_on_selector_all(
            "#nodes tbody tr", "rs => rs.map(r => [r.dataset.node, "
            "r.querySelector('.status').textContent])")
        seen["admin_buttons"] = page.locator("button[data-action=scale]").count()
        page.wait_for_selector("#events li")
        page.screenshot(path=os.path.join(shots, "dashboard.png"), full_page=True)

        row = page.locator("tr[data-service=web]")
        num = row.locator("[data-action=scale-input]")
        # A live refresh that replaces the row between Playwright's checks and its focus
        # takes the typed value with the old input (seen once in CI: "web scaled to 1"),
        # so type until the row shown holds the value.
        for _ in range(20):
            num.fill("3")
            if num.input_value() == "3":
                break
        # leave the row and let a live refresh renew it: what was typed stays
        page.evaluate("() => { document.activeElement.blur(); "
                      "document.querySelector('tr[data-service=web]').dataset.old = '1'; }")
        page.wait_for_function(
            "() => !document.querySelector('tr[data-service=web]').dataset.old")
        seen["typed_kept"] = num.input_value()
        row.locator("[data-action=scale]").click()
        wait_text(page, "tr[data-service=web] .replicas", "3/3")  # renewed beside the focus
        seen["scaled"] = text(page, "tr[data-service=web] .replicas")
        seen["focus_kept"] = page.evaluate("() => document.activeElement.dataset.action || ''")

        os.kill(int(kill_pid), signal.SIGKILL)  # the node's agent; its tasks run on
        wait_text(page, f"tr[data-node={down_host}] .status", "down", timeout=90000)
        seen["down"] = text(page, f"tr[data-node={down_host}] .status")
        seen["same_page"] = page.evaluate("window.__noReload")
        page.screenshot(path=os.path.join(shots, "dashboard-node-down.png"), full_page=True)

        h2 = page.locator("tr[data-node=h2]")
        h2.locator("button[data-action=drain]").click()
        wait_text(page, "tr[data-node=h2] .availability", "drain")
        h2.locator("button[data-action=activate]").click()
        wait_text(page, "tr[data-node=h2] .availability", "active")
        seen["drained_and_activated"] = True
        page.locator("tr[data-service=web] button[data-action=logs]").click()
        wait_text(page, "#logs", "(no output)")  # `sleep` prints nothing; the route answered
        seen["logs"] = text(page, "#logs-service")

        # a change with the session cookie but without its CSRF token
        seen["no_csrf"] = page.evaluate(
            "fetch('/api/v1/services/web/scale', {method: 'POST', headers: "
            "{'Content-Type': 'application/json'}, body: JSON.stringify({replicas: 1})})"
            ".then(async r => [r.status, (await r.json()).error.field])")
        seen["after_no_csrf"] = text(page, "tr[data-service=web] .replicas").split("/")[1]

        page.click("#logout")
        page.wait_for_selector("#login-view:not([hidden])")
        login(page, "bob", viewer_pw)
        page.wait_for_selector("#app-view:not([hidden])")
        page.wait_for_function(
            "() => document.querySelectorAll('#services tbody tr').length === 1")
        seen["viewer_who"] = text(page, "#who")
        seen["viewer_buttons"] = page.locator(
            "button[data-action]:not([data-action=logs])").count()
        seen["viewer_inputs"] = page.locator("input[data-action]").count()
        page.screenshot(path=os.path.join(shots, "dashboard-viewer.png"), full_page=True)
        # the viewer's session calls the API with its CSRF token: still refused by role
        seen["viewer_scale"] = page.evaluate(
            "fetch('/session').then(r => r.json()).then(s => fetch("
            "'/api/v1/services/web/scale', {method: 'POST', headers: {'Content-Type': "
            "'application/json', 'X-CSRF-Token': s.csrf}, body: JSON.stringify({replicas: 1})}))"
            ".then(async r => [r.status, (await r.json()).error.message])")
        seen["viewer_read"] = page.evaluate(
            "fetch('/api/v1/services?stale=1').then(r => r.status)")

        page.click("#logout")
        page.wait_for_selector("#login-view:not([hidden])")
        codes = []
        for _ in range(6):
            r = page.request.post(base + "/login",
                                  data=json.dumps({"user": "bob", "password": "wrong-pw-x"}),
                                  headers={"Content-Type": "application/json"})
            codes.append(r.status)
        seen["wrong_logins"] = codes
        login(page, "bob", viewer_pw)  # the right password, while rate-limited
        page.wait_for_function("() => document.querySelector('#login-error').textContent !== ''")
        seen["limited_message"] = text(page, "#login-error")
        page.screenshot(path=os.path.join(shots, "dashboard-login-limited.png"))
    except Exception as exc:
        seen["error"] = f"{type(exc).__name__}: {exc}"
        try:
            page.screenshot(path=os.path.join(shots, "failure.png"), full_page=True)
        except Exception:
            pass
    finally:
        browser.close()
print(json.dumps(seen))
"""

# A request to the remote API (mTLS) or the dashboard's API; prints [status, body].
REQUEST = r"""
import http.client, json, ssl, sys
url, method, path, tls_dir, token, body = sys.argv[1:7]
host, port = url.split("//")[1].split(":")
if url.startswith("https"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(tls_dir + "/ca.pem")
    ctx.load_cert_chain(tls_dir + "/cert.pem", tls_dir + "/key.pem")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
else:
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
headers = {"Content-Type": "application/json"}
if token:
    headers["Authorization"] = "Bearer " + token
conn.request(method, path, body=body or None, headers=headers)
r = conn.getresponse()
print(json.dumps([r.status, json.loads(r.read() or b"null")]))
"""


def user_add(host: Host, name: str, role: str, password: str) -> None:
    """`shoal user add NAME --role ROLE --password-stdin` with the password piped in."""
    shoal = " ".join(host.shoal_argv)
    host.run("sh", "-c", f'printf "%s\\n" "$0" | {shoal} -H unix://{host.sock} user add '
             f"{name} --role {role} --password-stdin", password)


def request(host: Host, url: str, method: str, path: str, tls_dir: str = "", token: str = "",
            body: Any = None) -> tuple[int, Any]:
    out = host.run(sys.executable, "-c", REQUEST, url, method, path, tls_dir, token,
                   json.dumps(body) if body is not None else "").stdout
    status, reply = json.loads(out)
    return status, reply


@pytest.fixture
def cluster(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(3)
    for h in lab.hosts:
        h.start_agent("--dashboard-addr", "127.0.0.1:8088",
                      "--remote-api-port", str(REMOTE_PORT))
    lab.form_cluster(managers=3)
    return lab


def test_dashboard_shows_the_cluster_live_acts_by_role_and_refuses_the_rest(
        cluster: Lab, tmp_path: Path) -> None:
    """Log in, see 3 nodes and a service, scale it from the page and watch the replicas
    change, kill a node's agent and watch it turn down — all without a reload; drain and
    activate a node and read a service's logs from the page; a viewer gets
    no action buttons and the API refuses their changes (403, on the dashboard and on the
    remote API, by session, bearer token or client certificate); a change without the
    session's CSRF token is refused; wrong passwords are refused, then rate-limited."""
    h1, h3 = cluster.hosts[0], cluster.hosts[2]
    user_add(h1, "alice", "admin", ADMIN_PW)
    user_add(h1, "bob", "viewer", VIEWER_PW)
    users = h1.cli_json("user", "ls")
    assert [(u["name"], u["role"], u["password"]) for u in users] == \
        [("alice", "admin", True), ("bob", "viewer", True)]
    assert ADMIN_PW not in json.dumps(users) and "scrypt" not in json.dumps(users)
    h1.cli("service", "create", "--name", "web", "--replicas", "1", *SLEEP)

    shots = Path(os.environ.get("SHOAL_DASHBOARD_SHOTS") or tmp_path).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    assert h3.agent_pid is not None
    out = h1.run(sys.executable, "-c", BROWSER, CHROMIUM, DASH, ADMIN_PW, VIEWER_PW,
                 str(h3.agent_pid), h3.name, str(shots), timeout=240).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert "error" not in seen, f"the browser saw {seen}\n{h1.log_tail()}"
    assert sorted(seen["nodes"]) == [["h1", "ready"], ["h2", "ready"], ["h3", "ready"]]
    assert seen["admin_buttons"] == 1
    assert seen["typed_kept"] == "3"  # a refresh kept what was typed in a row left
    assert seen["scaled"] == "3/3" and seen["focus_kept"] == "scale"
    assert seen["down"] == "down" and seen["same_page"] == "same page"
    assert seen["drained_and_activated"] and seen["logs"] == "web"
    assert seen["no_csrf"] == [403, "csrf"] and seen["after_no_csrf"] == "3"  # still wants 3
    assert seen["viewer_who"] == "bob (viewer)"
    assert seen["viewer_buttons"] == 0 and seen["viewer_inputs"] == 0
    assert seen["viewer_scale"][0] == 403 and "operator" in seen["viewer_scale"][1]
    assert seen["viewer_read"] == 200
    assert seen["wrong_logins"] == [401] * 5 + [429]
    assert "Too many failed logins" in seen["limited_message"]
    assert "failed dashboard login for user 'bob'" in h1.agent_log.read_text()
    assert "wrong-pw-x" not in h1.agent_log.read_text()
    assert h1.cli_json("service", "ls")[0]["replicas"] == 3

    # the remote API (mTLS): a certificate issued for the viewer may read, not change
    tls = str(tmp_path / "bob")
    h1.cli("ca", "issue-client", "bob-laptop", "--user", "bob", "--out", tls)
    remote = f"https://{h1.ip}:{REMOTE_PORT}"
    assert request(h1, remote, "GET", "/v1/services?stale=1", tls)[0] == 200
    status, reply = request(h1, remote, "POST", "/v1/services/web/scale", tls,
                            body={"replicas": 1})
    assert status == 403 and "operator" in reply["error"]["message"], reply
    status, reply = request(h1, remote, "POST", "/v1/users", tls,
                            body={"name": "eve", "role": "admin", "password": "x" * 12})
    assert status == 403 and "admin" in reply["error"]["message"], reply
    # a bearer token of the viewer on the dashboard's API: the same refusal
    token = h1.cli("user", "token", "bob").stdout.strip()
    assert request(h1, DASH, "GET", "/api/v1/nodes?stale=1", token=token)[0] == 200
    assert request(h1, DASH, "POST", "/api/v1/services/web/scale", token=token,
                   body={"replicas": 1})[0] == 403
    assert request(h1, DASH, "GET", "/api/v1/nodes", token="shoal_forged")[0] == 401
    # the CLI on the remote API with an admin's certificate, acting as the token's user
    ops = str(tmp_path / "ops")
    h1.cli("ca", "issue-client", "ops", "--out", ops)
    shoal = " ".join(h1.shoal_argv)
    res = h1.run("sh", "-c", f'SHOAL_TOKEN="$0" {shoal} -H tcp://{h1.ip}:{REMOTE_PORT} '
                 f"--tls-dir {ops} service scale web=1", token, check=False)
    assert res.returncode == 1 and "needs the operator role" in res.stderr, res.stderr
    # a role change applies to the very next request (looked up each time)
    h1.cli("user", "update", "bob", "--role", "operator")
    status, reply = request(h1, remote, "POST", "/v1/services/web/scale", tls,
                            body={"replicas": 2})
    assert status == 200, reply
    wait_until(lambda: h1.cli_json("service", "ls")[0]["replicas"] == 2, timeout=30,
               what="the operator's scale applied")
    # an operator deploys applications but is not root on a node: no host paths, host
    # network, added capabilities, registry credentials, node role changes (admins may)
    spec = {"name": "host", "task": {"container": {"command": ["sleep", "9"], "mounts": [
        {"type": "bind", "source": "/", "target": "/host"}]}}}
    status, reply = request(h1, remote, "POST", "/v1/services", tls, body={"spec": spec})
    assert status == 403 and reply["error"]["field"] == "task.container.mounts[0]", reply
    assert "bind mount of the node's /" in reply["error"]["message"], reply
    for change, field in (({"network_mode": "host"}, "task.network_mode"),
                          ({"container": {"command": ["sleep", "9"], "cap_add": ["SYS_ADMIN"]}},
                           "task.container.cap_add")):
        spec = {"name": "host", "task": {"container": {"command": ["sleep", "9"]}, **change}}
        status, reply = request(h1, remote, "POST", "/v1/services", tls, body={"spec": spec})
        assert status == 403 and reply["error"]["field"] == field, reply
    status, reply = request(h1, remote, "POST", "/v1/secrets", tls, body={
        "name": "registry-auth.reg-5000", "data": "eA=="})
    assert status == 403 and "registry credentials" in reply["error"]["message"], reply
    status, reply = request(h1, remote, "POST", "/v1/nodes/h1", tls, body={"role": "worker"})
    assert status == 403 and reply["error"]["field"] == "role", reply
    status, reply = request(h1, remote, "POST", "/v1/services", tls, body={"spec": {
        "name": "plain", "task": {"container": {"command": ["sleep", "9"],
                                                "cap_add": ["NET_BIND_SERVICE"]}}}})
    assert status == 200, reply  # (Docker's default capabilities: an operator's)
    h1.cli("service", "create", "-d", "--name", "host", "--mount",
           "type=bind,src=/tmp,dst=/host", "--", "sleep", "9")  # (root on the node: may)
    # removing the user revokes their certificate
    h1.cli("user", "rm", "bob")
    assert request(h1, remote, "GET", "/v1/services?stale=1", tls)[0] == 401
