"""Event latency: a committed change → its line at a `shoal events` client.

    .venv/bin/python bench/events_latency.py [--changes 1000] [--cluster]

Default: one netns host (tests/netlab.py) running a one-node cluster. ``--cluster``: three
managers; the changes are written on h1 and the client reads from h2, so Raft replication
to another manager is on the path. The client is the real CLI (`shoal events --format
json`) in a subprocess; a thread stamps each line as it arrives. Each change is one
`node update --label-add` through h1's unix-socket API, one at a time (the next after the
previous one's reply).

Three figures per change (all clocks are this machine's):

* reply → line: the line's arrival minus the moment the write's API reply arrived. The
  reply comes once the write is committed *and* applied on h1, so this is the closest
  outside view of "commit → event line" (negative when the line beat the reply);
* propose → line: minus the event's ``time`` (the ``now`` h1 put in the command before
  proposing it): includes the Raft commit itself;
* write round trip: API request → reply, for reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import fmt

from netlab import Lab
from shoal.cli.main import Client


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--cluster", action="store_true",
                    help="3 managers: write on h1, read the events on h2")
    args = ap.parse_args()
    with Lab(3 if args.cluster else 1) as lab:
        lab.form_cluster(managers=3 if args.cluster else 1)
        writer, reader = lab.hosts[0], lab.hosts[1 if args.cluster else 0]
        c = Client(f"unix://{writer.sock}")
        node_id = c.call("GET", "/v1/info")["node_id"]
        proc = subprocess.Popen(
            [str(lab.shoal), "-H", f"unix://{reader.sock}", "events", "--format", "json",
             "--filter", "type=node", "--filter", "event=update"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        arrivals: dict[str, tuple[float, float]] = {}  # label value → (arrival, event time)
        done = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.time()
                ev = json.loads(line)
                mark = ev["attributes"].get("labels", {}).get("bench", "")
                arrivals[mark] = (now, float(ev["time"]))
                if len(arrivals) >= args.changes:
                    done.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        time.sleep(1.0)  # the stream is open
        replies: dict[str, tuple[float, float]] = {}
        try:
            for i in range(args.changes):
                mark = str(i)
                t0 = time.time()
                c.call("POST", f"/v1/nodes/{node_id}", {"label_add": {"bench": mark}})
                replies[mark] = (t0, time.time())
            done.wait(30)
        finally:
            proc.kill()
            proc.wait()
        got = [m for m in replies if m in arrivals]
        reply_to_line = [arrivals[m][0] - replies[m][1] for m in got]
        propose_to_line = [arrivals[m][0] - arrivals[m][1] for m in got]
        round_trip = [replies[m][1] - replies[m][0] for m in got]
        where = "3 managers, written on h1, read on h2" if args.cluster else "one node"
        print(f"{len(got)}/{args.changes} changes seen by `shoal events` ({where})")
        print(fmt("reply -> line", reply_to_line))
        print(fmt("propose -> line", propose_to_line))
        print(fmt("write round trip", round_trip))
        missing = args.changes - len(got)
        if missing:
            print(f"MISSING: {missing} events never arrived")


if __name__ == "__main__":
    main()
