"""The routing mesh inside a real shoal cluster: control-plane stability under full data-path
load, and a published port vs the task directly.

    .venv/bin/python bench/mesh_bench.py [--duration 60] [--conns 64] [--direct 10]

Needs root, iproute2, tini and Debian's `wrk` and `nginx-light` (it installs nothing: it says
what is missing). Layout: four netns hosts on one bridge (tests/netlab.py): h1-h3 run shoal
agents (3 managers, gossip LAN preset, the real agent with its mesh), h4 is the client (wrk,
not a member; routes to the nodes' task subnets via each node, so it can also reach a task
directly). The service: 3 nginx tasks (one per node, `return 200` of 64 bytes, keep-alive),
published 8080:8000.

Measured:
  stability  wrk at full speed for ``--duration`` s against the *leader's* node:8080 (the
             node whose agent has most to lose). Before/after, on every manager, via `shoal
             info`: Raft term (a change = an election) and leader, gossip `suspicions` and
             `event.suspect`; plus `suspect` lines in every agent log. Target: 0 and 0.
  vs direct  wrk ``--direct`` s each: h4 -> a task's address (kernel forwarding through its
             node) and h4 -> that node's 8080 (the node's balancer -> the 3 tasks).

Everything (lab netns, agents, tasks, wrk) is removed on exit, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Host, Lab, wait_until

NGINX = (
    "mkdir -p /tmp/n && printf '%s' 'daemon off; master_process off; worker_processes 1; "
    "pid /tmp/n/pid; error_log stderr; events { worker_connections 4096; } http { "
    "access_log off; client_body_temp_path /tmp/n; proxy_temp_path /tmp/n; "
    "fastcgi_temp_path /tmp/n; uwsgi_temp_path /tmp/n; scgi_temp_path /tmp/n; server { "
    "listen 8000; location / { return 200 \"0123456789012345678901234567890123456789"
    "01234567890123456789012\\n\"; } } }' > /tmp/n/nginx.conf && "
    "exec nginx -e stderr -p /tmp/n -c /tmp/n/nginx.conf"
)

LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk(client: Host, url: str, seconds: float, conns: int, lua: Path) -> dict[str, Any]:
    res = client.run("wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "-s", str(lua), url,
                     timeout=seconds + 60)
    line = next(x for x in res.stdout.splitlines() if x.startswith("{"))
    out: dict[str, Any] = json.loads(line)
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    return out


def control_plane(lab: Lab, members: list[Host]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for h in members:
        info = json.loads(h.cli("info").stdout)
        stats = (info.get("gossip") or {}).get("stats", {})
        out[h.name] = {"term": info["term"], "leader": info["leader"],
                       "suspicions": stats.get("suspicions", 0),
                       "suspect_events": stats.get("event.suspect", 0),
                       "suspect_log_lines": sum("suspect" in line.lower() for line in
                                                h.agent_log.read_text().splitlines())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--direct", type=float, default=10.0)
    ap.add_argument("--conns", type=int, default=64)
    args = ap.parse_args()
    missing = [t for t in ("wrk", "nginx", "ip", "tini") if shutil.which(t) is None]
    if missing:
        print(f"missing: {' '.join(missing)} (apt-get install -y wrk nginx-light iproute2 tini)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with Lab(4) as lab:
        members, client = lab.hosts[:3], lab.hosts[3]
        lab.form_cluster(managers=3)
        h1 = members[0]
        h1.cli("service", "create", "--name", "web", "--replicas", "3", "--publish",
               "8080:8000", "--", "sh", "-c", NGINX)

        def running() -> list[dict[str, Any]] | None:
            ts = [t for t in h1.cli_json("service", "ps", "web") if t["state"] == "running"]
            return ts if len(ts) == 3 else None
        tasks = wait_until(running, timeout=60, interval=0.3, what="3 nginx tasks")
        nets = {h.name: json.loads(h.cli("info").stdout)["network"] for h in members}
        for h in members:
            client.run("ip", "route", "add", nets[h.name]["subnet"], "via", h.ip)
        lua = lab.root / "report.lua"
        lua.write_text(LUA)
        leader = next(h for h in members if json.loads(h.cli("info").stdout)["is_leader"])
        task_on_leader = next(t for t in tasks if t["node"] == leader.name)
        task_ip = nets[leader.name]["tasks"][task_on_leader["id"]]
        wait_until(lambda: wrk(client, f"http://{leader.ip}:8080/", 1, 4, lua)["errors"] == 0
                   and True, timeout=30, interval=0.5, what="the published port to answer")
        print(f"cluster: 3 managers; load on the leader's node {leader.name} ({leader.ip}); "
              f"task {task_on_leader['name']} at {task_ip}")

        direct = wrk(client, f"http://{task_ip}:8000/", args.direct, args.conns, lua)
        mesh = wrk(client, f"http://{leader.ip}:8080/", args.direct, args.conns, lua)
        for name, r in (("direct (task)", direct), ("published port", mesh)):
            print(f"{name:16s} {r['rps']:9.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
                  f"p99 {r['p99_us'] / 1000:6.2f} ms  errors {r['errors']}")
        print(f"published / direct: {mesh['rps'] / direct['rps']:.2f}")

        before = control_plane(lab, members)
        t0 = time.monotonic()
        load = wrk(client, f"http://{leader.ip}:8080/", args.duration, args.conns, lua)
        elapsed = time.monotonic() - t0
        after = control_plane(lab, members)
        print(f"stability: {args.duration:g} s at full load through {leader.name}:8080: "
              f"{load['rps']:.0f} req/s, {load['requests']} requests, errors {load['errors']} "
              f"({elapsed:.1f} s)")
        changes = 0
        for name in before:
            b, a = before[name], after[name]
            changes = max(changes, a["term"] - b["term"])
            print(f"  {name}: term {b['term']} -> {a['term']}, leader {b['leader']} -> "
                  f"{a['leader']}, suspicions +{a['suspicions'] - b['suspicions']}, suspect "
                  f"events +{a['suspect_events'] - b['suspect_events']}, 'suspect' log lines "
                  f"+{a['suspect_log_lines'] - b['suspect_log_lines']}")
        susp = sum(after[n]["suspicions"] - before[n]["suspicions"] +
                   after[n]["suspect_events"] - before[n]["suspect_events"] for n in before)
        print(f"leader changes (max term increase): {changes}; suspicions + suspect events: "
              f"{susp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
