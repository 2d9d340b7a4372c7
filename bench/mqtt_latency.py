"""Event latency through the MQTT bridge, side by side with the HTTP event stream.

    .venv/bin/python bench/mqtt_latency.py [--changes 1000] [--cluster] [--creates 0]

One netns host (tests/netlab.py) runs a one-node cluster whose agent bridges to a real
mosquitto (Debian's; TLS + password, started in that host's netns on 127.0.0.1);
``--cluster``: three managers, the changes written on h1, the broker in h1 (the leader
publishes). Two clients read the same changes at the same time, each in a subprocess with a
thread stamping every line as it arrives:

* HTTP: the real CLI, ``shoal events --format json --since T`` (GET /v1/events, NDJSON), on
  h1, T a time before the first write (a client connecting late still sees every change);
* MQTT: ``mosquitto_sub -v`` subscribed to ``PREFIX/events/node`` at QoS 1.

Each change is one ``node update --label-add`` through h1's unix-socket API, one at a time
(the next after the previous one's reply). Per client: reply → line (the line's arrival
minus the write's API reply, which comes once it is committed and applied: the outside
view of "commit → event") and propose → line (minus the event's ``time``, the ``now`` put in
the command before proposing it). All on this machine's clock.

The bridge is configured cluster-wide (``shoal mqtt set``, through the API).

``--creates N``: the cost of the bridge on the control path: N x (``service create`` →
its task RUNNING) with the bridge connected, N without a bridge, and N with the broker
stopped (the bridge retrying in the background), on the same agent, alternating in rounds of
5 (``mqtt unset`` / ``mqtt set``: the bridge follows live; the machine's load drifts); the
medians side by side, as "% slower than no bridge" (the issue's target: <= 5 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import benchlab
from test_mqtt import PASSWORDS, Broker

from netlab import Host, Lab, wait_until
from shoal.cli.main import Client

PREFIX = "shoal/c1"  # the test broker's ACL lets node1 write there


def fmt(name: str, xs: list[float]) -> str:
    return benchlab.fmt(name, xs, width=28)


class Stamper:
    """Reads a subprocess's lines on a thread; ``parse(line)`` → (mark, event time) or None."""

    def __init__(self, argv: list[str], parse: Callable[[str], tuple[str, float] | None],
                 want: int) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.arrivals: dict[str, tuple[float, float]] = {}
        self.done = threading.Event()
        self._parse, self._want = parse, want
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            got = self._parse(line)
            if got is None:
                continue
            self.arrivals[got[0]] = (now, got[1])
            if len(self.arrivals) >= self._want:
                self.done.set()
                return

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _mark(ev: dict[str, Any]) -> tuple[str, float] | None:
    mark = ev.get("attributes", {}).get("labels", {}).get("bench")
    return (str(mark), float(ev["time"])) if mark is not None else None


def parse_http(line: str) -> tuple[str, float] | None:
    return _mark(json.loads(line)) if line.startswith("{") else None


def parse_mqtt(line: str) -> tuple[str, float] | None:
    _topic, _, payload = line.partition(" ")
    return _mark(json.loads(payload)) if payload.startswith("{") else None


def mqtt_set(h: Host, broker: Broker) -> None:
    """The cluster-wide setting (`shoal mqtt set`), through h's API; the bridges follow it
    within a second (the supervisor polls), connect, publish: waited for here."""
    Client(f"unix://{h.sock}").call("POST", "/v1/mqtt", {
        "url": f"mqtts://node1@{broker.ip}:{broker.port}", "password": PASSWORDS["node1"],
        "ca": Path(broker.ca).read_text(), "topic_prefix": PREFIX})
    time.sleep(2.0)


def mqtt_unset(h: Host) -> None:
    Client(f"unix://{h.sock}").call("DELETE", "/v1/mqtt")
    time.sleep(1.5)


def event_latency(lab: Lab, broker: Broker, changes: int) -> None:
    h1 = lab.hosts[0]
    c = Client(f"unix://{h1.sock}")
    node_id = c.call("GET", "/v1/info")["node_id"]
    # --since a time before the first write: a client that connects late (a loaded machine)
    # still gets every change from the ring, instead of only those after it connected
    since = f"{time.time():.3f}"
    http = Stamper([str(lab.shoal), "-H", f"unix://{h1.sock}", "events", "--format", "json",
                    "--since", since,
                    "--filter", "type=node", "--filter", "event=update"], parse_http, changes)
    mqtt = Stamper(["nsenter", f"--net=/var/run/netns/{h1.netns}", "stdbuf", "-oL",
                    "mosquitto_sub", "-h", broker.ip, "-p", str(broker.port), "--cafile",
                    broker.ca, "-u", "admin", "-P", PASSWORDS["admin"], "-q", "1", "-v",
                    "-t", f"{PREFIX}/events/node"], parse_mqtt, changes)
    time.sleep(1.5)  # both streams open
    replies: dict[str, float] = {}
    try:
        for i in range(changes):
            c.call("POST", f"/v1/nodes/{node_id}", {"label_add": {"bench": str(i)}})
            replies[str(i)] = time.time()
        http.done.wait(30)
        mqtt.done.wait(30)
    finally:
        http.close()
        mqtt.close()
    for name, s in (("HTTP (shoal events)", http), ("MQTT (mosquitto_sub)", mqtt)):
        got = [m for m in replies if m in s.arrivals]
        print(f"{name}: {len(got)}/{changes} changes seen")
        print(fmt("  reply -> line", [s.arrivals[m][0] - replies[m] for m in got]))
        print(fmt("  propose -> line", [s.arrivals[m][0] - s.arrivals[m][1] for m in got]))
    both = [m for m in replies if m in http.arrivals and m in mqtt.arrivals]
    print(fmt("MQTT minus HTTP arrival", [mqtt.arrivals[m][0] - http.arrivals[m][0]
                                          for m in both]))


def create_to_running(h: Host, n: int, tag: str) -> list[float]:
    """``service create`` → its task reported RUNNING, through the unix-socket API (the
    task list polled every 5 ms), one service at a time."""
    c = Client(f"unix://{h.sock}")
    out = []
    for i in range(n):
        name = f"{tag}{i}"

        def running(name: str = name) -> bool | None:
            tasks = c.call("GET", f"/v1/services/{name}/tasks")
            items = tasks.get("tasks", tasks) if isinstance(tasks, dict) else tasks
            return any(t.get("state") == "running" for t in items) or None
        t0 = time.monotonic()
        c.call("POST", "/v1/services", {"spec": {"name": name, "task": {"container": {
            "command": ["sleep", "100000"]}}}})
        wait_until(running, timeout=30, interval=0.005, what=f"{name} running")
        out.append(time.monotonic() - t0)
        c.call("DELETE", f"/v1/services/{name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--cluster", action="store_true", help="3 managers, written on h1")
    ap.add_argument("--creates", type=int, default=0,
                    help="also N x service create → RUNNING: bridge up, broker down, no bridge")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-mqtt-bench-") as tmp, \
            Lab(3 if args.cluster else 1) as lab:
        h1 = lab.hosts[0]
        broker = Broker(Path(tmp) / "broker", ip=h1.ip, spawn=lambda argv: h1.spawn(
            *argv, log_name="mosquitto"))
        broker.start()
        try:
            lab.form_cluster(managers=3 if args.cluster else 1)
            mqtt_set(h1, broker)
            where = "3 managers, written on h1" if args.cluster else "one node"
            if args.changes:
                print(f"event latency, {args.changes} changes, {where}")
                event_latency(lab, broker, args.changes)
            up: list[float] = []
            down: list[float] = []
            none: list[float] = []
            if args.creates:
                # the same agent, alternately with and without the bridge (`mqtt set` /
                # `mqtt unset`, followed live), in rounds of 5: the machine's load drifts
                for r in range(0, args.creates, 5):
                    up += create_to_running(h1, 5, f"up{r}-")
                    mqtt_unset(h1)
                    none += create_to_running(h1, 5, f"none{r}-")
                    broker.stop()
                    mqtt_set(h1, broker)  # (its bridge retrying in the background)
                    down += create_to_running(h1, 5, f"down{r}-")
                    broker.start()
                    mqtt_unset(h1)  # a fresh bridge: no back-off left from the broker's absence
                    mqtt_set(h1, broker)
                print(fmt(f"create→running, bridge up ({len(up)})", up))
                print(fmt(f"create→running, no bridge ({len(none)})", none))
                print(fmt(f"create→running, broker down ({len(down)})", down))
        finally:
            broker.stop()
    if args.creates:
        base = statistics.median(none)
        for name, xs in (("bridge up", up), ("broker down", down)):
            print(f"{name} vs no bridge: median {100 * (statistics.median(xs) / base - 1):+.1f} %"
                  " (target <= +5 %)")
    with contextlib.suppress(OSError):
        print("load average", Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
