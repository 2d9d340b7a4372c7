"""Rolling-update convergence: how close a health-checked start-first update comes to the
time its configuration alone makes it take (issue 12's benchmark).

    .venv/bin/python bench/update_converge.py [--replicas 20] [--parallelism 2]
        [--ready 3] [--delay 1] [--monitor 1] [--runs 1]

One netns host (tests/netlab.py) runs a one-node cluster. A service of ``--replicas`` tasks,
each an HTTP server whose health endpoint answers 200 only ``--ready`` seconds after the task
started (an application warming up; ``--health-start-period`` is set to the same time, so a
probe can pass only from the end of the start period), probed over HTTP every ``--interval``
(0.2 s; 50 retries, so that a loaded machine's slow starts are not counted as failures), is
updated start-first, ``--parallelism`` at a time, with ``--update-delay`` and
``--update-monitor``. Measured: from the update's start to ``completed`` (both the leader's
clock, from `service inspect`), against the lower bound the configuration sets:
``batches x ready + (batches - 1) x delay + monitor`` (a batch cannot be up before its start
period ends, the next waits the delay, the end waits the monitor). The script also samples
`service ps` to report the most tasks running at once (at most replicas + parallelism) and
the fewest up (start-first: never below replicas). Prints the ratio; the machine's load
average is printed with it (the figure depends on it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab, wait_until
from shoal.cli.main import Client

# /health answers 200 from READY seconds after the start (argv[1]: READY, argv[2]: version)
SERVER = ("mkdir -p /tmp/w; cd /tmp/w || exit 1; echo $2 > version; "
          "(sleep $1; echo ok > health) & exec python3 -m http.server 8000 --bind 0.0.0.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=20)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--ready", type=float, default=3.0, help="health start period, seconds")
    ap.add_argument("--delay", type=float, default=1.0, help="update delay, seconds")
    ap.add_argument("--monitor", type=float, default=1.0, help="update monitor, seconds")
    ap.add_argument("--interval", type=float, default=0.2, help="health probe interval")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    batches = math.ceil(args.replicas / args.parallelism)
    bound = batches * args.ready + (batches - 1) * args.delay + args.monitor
    with Lab(1) as lab:
        lab.form_cluster(managers=1)
        h = lab.hosts[0]
        c = Client(f"unix://{h.sock}")
        h.cli("service", "create", "--name", "web", "--replicas", str(args.replicas),
              "--health-http", ":8000/health", "--health-interval", f"{args.interval}s",
              "--health-retries", "50", "--health-start-period", f"{args.ready}s",
              "--update-order", "start-first", "--update-parallelism", str(args.parallelism),
              "--update-delay", f"{args.delay}s", "--update-monitor", f"{args.monitor}s",
              "--stop-grace-period", "2s", "--restart-delay", "0s",
              "--", "sh", "-c", SERVER, "sh", str(args.ready), "0", timeout=60)

        def healthy() -> bool:
            ts = c.call("GET", "/v1/services/web/tasks")
            return sum(t["state"] == "running" and t["health"] == "healthy"
                       and t["desired_state"] == "running" for t in ts) == args.replicas
        wait_until(healthy, timeout=600, interval=0.5, what="every task healthy")
        print(f"{args.replicas} replicas, parallelism {args.parallelism}, start-first, "
              f"ready (start period) {args.ready}s, delay {args.delay}s, monitor "
              f"{args.monitor}s: {batches} batches, lower bound {bound:.1f}s")
        for run in range(1, args.runs + 1):
            samples: list[tuple[int, int]] = []
            stop = threading.Event()

            def sample(stop: threading.Event, samples: list[tuple[int, int]]) -> None:
                while not stop.is_set():
                    try:
                        ts: list[dict[str, Any]] = c.call(
                            "GET", "/v1/services/web/tasks?stale=1")
                    except Exception:  # (a sample lost to a busy agent: the next one counts)
                        continue
                    running = [t for t in ts if t["state"] == "running"]
                    up = [t for t in running if t["health"] == "healthy"
                          and t["desired_state"] == "running"]
                    samples.append((len(running), len(up)))
                    time.sleep(0.1)
            sampler = threading.Thread(target=sample, args=(stop, samples))
            load_before = os.getloadavg()
            sampler.start()
            h.cli("service", "update", "web", "--", "sh", "-c", SERVER, "sh",
                  str(args.ready), str(run))

            def done() -> dict[str, Any] | None:
                s: dict[str, Any] = c.call("GET", "/v1/services/web")["update_status"]
                return s if s["state"] in ("completed", "paused") else None
            status = wait_until(done, timeout=bound * 5 + 60, interval=0.2,
                                what="the update completed")
            stop.set()
            sampler.join()
            load_after = os.getloadavg()
            if status["state"] != "completed":
                print(f"run {run}: the update paused: {status['message']}")
                continue
            took = status["completed_at"] - status["started_at"]
            print(f"run {run}: converged in {took:.2f}s = {took / bound:.2f} x the lower bound "
                  f"(target <= 1.2); most running at once {max(r for r, _ in samples)} "
                  f"(limit {args.replicas + args.parallelism}), fewest up "
                  f"{min(u for _, u in samples)}; load average {load_before[0]:.1f} -> "
                  f"{load_after[0]:.1f}")


if __name__ == "__main__":
    main()
