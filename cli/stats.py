"""`shoal stats`: live CPU, memory, I/O and process counts of running tasks across the cluster
(`docker stats`, but over every node, as `kubectl top pods`).

Owns: the command's arguments, the CPU share computed from two samples of the tasks' CPU time
(``rows``: pure), and the refresh loop. Must not touch: the agent (only its API, /v1/stats),
other commands.

CPU % is of one core (200 % = two busy cores), as Docker's, over the time between the two
reads of the task's node (``read_at``), as Docker's over its daemon's read times; MEM USAGE
is the task's working set (its cgroup's charge less the inactive file cache, Docker's and
Kubernetes' rule) over its memory limit, else its node's memory, as Docker shows the host's
for a container without a limit. A task seen in one sample only (it started or ended between
them) shows no CPU % yet. NET I/O and BLOCK I/O are totals since the task started, in
Docker's decimal units: received / sent on every interface of the task's own network
namespace but lo ("--" for a host-network task: the node's traffic is not the task's), read /
written through block devices (a cached write counts when it is written to the cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from shoal.cli import output

Rec = dict[str, Any]
INTERVAL = 1.0  # seconds between samples (Docker reads each container's stats every second)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="live CPU, memory and processes of running tasks on "
                       "every node (docker stats)")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help="only these services' tasks (default: every service)")
    p.add_argument("--node", action="append", default=[], metavar="NODE",
                   help="only the tasks on this node (hostname, id, or self; repeatable)")
    p.add_argument("--no-stream", action="store_true",
                   help="print one result (after two samples, a second apart) and exit")
    p.add_argument("--format", default="table", metavar="table|json|TEMPLATE",
                   help="table (default), json, or a Go-style template such as "
                   "'{{.Name}} {{.CPUPerc}} {{.MemUsage}}' ('table ...' adds headers)")
    p.add_argument("--no-trunc", action="store_true", help="do not cut ids")


def _pair(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "--"
    return f"{output.decimal_size(a, 3)} / {output.decimal_size(b, 3)}"


def rows(before: list[Rec], after: list[Rec], elapsed: float) -> list[Rec]:
    """One row per task of ``after`` (the /v1/stats records of the second sample):
    ``cpu_percent`` from the CPU time it used since ``before`` over the time between its
    node's two reads (``usage.read_at``; ``elapsed`` seconds, the client's, from a node that
    sends none) (None when either sample lacks it), the memory against its limit; Docker's
    strings for templates (``{{.CPUPerc}}``, ``{{.MemUsage}}``, ``{{.MemPerc}}``, ``{{.NetIO}}``,
    ``{{.BlockIO}}``, ``{{.PIDs}}``)."""
    cpu_before = {t["id"]: ((t.get("usage") or {}).get("cpu_seconds"),
                            (t.get("usage") or {}).get("read_at")) for t in before}
    out = []
    for t in after:
        usage: Mapping[str, Any] = t.get("usage") or {}
        cpu, (was, was_at) = usage.get("cpu_seconds"), cpu_before.get(t["id"], (None, None))
        at = usage.get("read_at")  # (when its node read it: an older agent sends none)
        span = at - was_at if isinstance(at, (int, float)) and isinstance(
            was_at, (int, float)) and at > was_at else elapsed
        cpu_percent = (max(cpu - was, 0.0) / span * 100
                       if cpu is not None and was is not None and span > 0 else None)
        mem, limit = usage.get("memory_bytes"), t.get("memory_limit") or 0
        mem_percent = mem / limit * 100 if mem is not None and limit else None
        out.append({
            "id": t["id"], "container": t["id"], "name": t["name"], "service": t["service"],
            "node": t["node"], "cpu_percent": cpu_percent, "memory_bytes": mem,
            "memory_limit": limit, "memory_percent": mem_percent, "pids": usage.get("pids"),
            **{k: usage.get(k) for k in ("net_rx_bytes", "net_tx_bytes", "block_read_bytes",
                                         "block_write_bytes")},
            "net_io": _pair(usage.get("net_rx_bytes"), usage.get("net_tx_bytes")),
            "block_io": _pair(usage.get("block_read_bytes"), usage.get("block_write_bytes")),
            "cpu_perc": "--" if cpu_percent is None else f"{cpu_percent:.2f}%",
            "mem_usage": "-- / --" if mem is None else
            f"{output.binary_size(mem)} / {output.binary_size(limit) if limit else '--'}",
            "mem_perc": "--" if mem_percent is None else f"{mem_percent:.2f}%"})
    return out


def _pids(r: Rec, full: bool) -> str:
    return "--" if r["pids"] is None else str(r["pids"])


output.COLUMNS["stats"] = [
    ("ID", lambda r, f: r["id"] if f else r["id"][:12]), ("NAME", lambda r, f: r["name"]),
    ("NODE", lambda r, f: r["node"] or "-"), ("CPU %", lambda r, f: r["cpu_perc"]),
    ("MEM USAGE / LIMIT", lambda r, f: r["mem_usage"]),
    ("MEM %", lambda r, f: r["mem_perc"]), ("NET I/O", lambda r, f: r["net_io"]),
    ("BLOCK I/O", lambda r, f: r["block_io"]), ("PIDS", _pids)]


def run(c: Any, args: argparse.Namespace, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep) -> None:
    query = "&".join([f"service={quote(s, safe='')}" for s in args.services]
                     + [f"node={quote(n, safe='')}" for n in args.node])
    path = "/v1/stats" + (f"?{query}" if query else "")

    def sample() -> tuple[float, list[Rec]]:
        got = c.call("GET", path)
        return clock(), got

    was, before = sample()
    live = sys.stdout.isatty() and not args.no_stream
    while True:
        sleep(INTERVAL)
        now, after = sample()
        text = output.render(rows(before, after, now - was), "stats", args.format,
                             no_trunc=args.no_trunc)
        if live:  # (redrawn in place, as docker's)
            sys.stdout.write("\x1b[2J\x1b[H")
        print(text, flush=True)
        if args.no_stream:
            return
        if not live:
            print(flush=True)
        was, before = now, after
