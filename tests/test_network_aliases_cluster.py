"""Network aliases end to end: real agents on netns hosts, driven by the CLI (Docker's
``--network name=back,alias=primary``). Names are resolved from inside tasks (their logs
carry the answers), by each node's DNS server, so only the lab's namespaces are used."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from test_mesh import RESPONDER, task_log, wait_running

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns

# Runs as a task: once argv[1] resolves (the node's DNS server answers it), resolves every
# argument and fetches http://primary:8000/ if it resolved; prints one "OK {json}" line:
# name → its addresses, or "unknown" when the resolver found none.
PROBE = r"""
import json, socket, sys, time, urllib.request
for _ in range(240):
    try:
        socket.gethostbyname(sys.argv[1])
        break
    except OSError as exc:
        print("retry", repr(exc), flush=True)
        time.sleep(0.5)
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted(socket.gethostbyname_ex(name)[2])
    except OSError:
        out[name] = "unknown"
if out.get("primary") != "unknown":
    out["fetch"] = urllib.request.urlopen("http://primary:8000/", timeout=5).read().decode()
print("OK " + json.dumps(out), flush=True)
time.sleep(100000)
"""


def ok_line(lab: Lab, task: dict[str, Any]) -> dict[str, Any] | None:
    line = next((x for x in task_log(lab, task) if x.startswith("OK ")), None)
    return json.loads(line[3:]) if line is not None else None


def test_an_alias_resolves_to_the_services_vip_only_on_its_network(
        lab_factory: Callable[..., Lab]) -> None:
    """db joins back with the alias primary and front without one: a task on back (on the
    other node) resolves primary to db's VIP and reaches db through it, tasks.primary to db's
    address on back; a task on front resolves db but not primary."""
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1 = lab.hosts[0]
    h1.cli("network", "create", "back")
    h1.cli("network", "create", "front")
    h1.cli("service", "create", "--name", "db", "--network", "name=back,alias=primary",
           "--network", "front", "--expose", "8000", "--constraint", "node.role==manager",
           "--", "python3", "-c", RESPONDER, "8000")
    (db,) = wait_running(h1, "db", 1)
    (inspect,) = h1.cli_json("service", "inspect", "db")
    assert inspect["spec"]["task"]["network_aliases"] == {"back": ["primary"]}
    for name, net in (("onback", "back"), ("onfront", "front")):
        h1.cli("service", "create", "--name", name, "--network", net, "--constraint",
               "node.role==worker", "--", "python3", "-c", PROBE, "db", "primary",
               "tasks.primary")
    back_addr = h1.cli_json("network", "inspect", "back")[0]["tasks"][db["id"]]

    (onback,) = wait_running(h1, "onback", 1)
    res = wait_until(lambda: ok_line(lab, onback), timeout=90, interval=0.5,
                     what="the back client's OK line")
    assert res == {"db": [inspect["vip"]], "primary": [inspect["vip"]],
                   "tasks.primary": [back_addr], "fetch": "db-1"}, res
    (onfront,) = wait_running(h1, "onfront", 1)
    res = wait_until(lambda: ok_line(lab, onfront), timeout=90, interval=0.5,
                     what="the front client's OK line")
    assert res == {"db": [inspect["vip"]], "primary": "unknown",
                   "tasks.primary": "unknown"}, res
