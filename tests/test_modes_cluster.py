"""Service modes end to end: real agents on netns hosts, driven by the real CLI (issue 12's
must-shows 4 and 6: global services following nodes, jobs, scheduled jobs, placement)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns


def running(host: Host, service: str) -> dict[str, dict[str, Any]]:
    """Node hostname → the running task of ``service`` there."""
    return {t["node"]: t for t in host.cli_json("service", "ps", service)
            if t["state"] == "running"}


def test_a_global_service_follows_nodes_and_a_replicated_job_completes(
        lab_factory: Callable[..., Lab]) -> None:
    """`--mode global` runs one task on every node, starts one on a node that joins and
    stops the one of a drained node (`node ps` shows it); `--mode replicated-job` with 6
    completions, never more than 2 at a time, runs to completion and is not restarted;
    `service ls` shows both modes and the job's progress; a job with `--schedule` (every
    3 s) runs on its times and skips a time its previous run still holds (forbid), its runs
    in `service inspect`; `--max-replicas-per-node` and `--placement-pref spread=...` place
    as asked and a task that fits nowhere says why (must-shows 4 and 6)."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=1)
    h1, h2, h3 = lab.hosts
    h1.cli("service", "create", "--name", "agents", "--mode", "global", "--",
           "sleep", "100000")
    wait_until(lambda: sorted(running(h1, "agents")) == [h1.name, h2.name] or None,
               timeout=30, interval=0.3, what="a global task on h1 and h2")

    h3.start_agent()
    token = h1.cli("join-token", "worker", "-q").stdout.strip()
    h3.cli("join", "--token", token, f"{h1.ip}:2377", timeout=60)
    on = wait_until(lambda: ((r := running(h1, "agents")) and len(r) == 3 and r) or None,
                    timeout=40, interval=0.3, what="a global task on the joined h3")
    assert sorted(on) == sorted([h1.name, h2.name, h3.name])

    h1.cli("node", "update", "--availability", "drain", h2.name)
    wait_until(lambda: not pid_alive(on[h2.name]["pid"]), timeout=30,
               what="the drained node's task stopped")
    wait_until(lambda: sorted(running(h1, "agents")) == sorted([h1.name, h3.name]) or None,
               timeout=30, interval=0.3, what="global tasks on h1 and h3 only")
    on_h2 = h1.cli_json("node", "ps", h2.name)
    assert [(t["service"], t["desired_state"]) for t in on_h2] == [("agents", "shutdown")]

    # a job of 6 completions, 2 at a time: each task notes its start and end in a file the
    # hosts share, so "never more than 2 at once" is checked on the tasks' own clocks (and
    # sampled from `service ps` while it runs)
    out = Path(tempfile.mkdtemp(prefix="shoal-job-", dir="/tmp"))
    try:
        _batch_and_cron(h1, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert [t["service"] for t in h1.cli_json("node", "ps")].count("agents") == 1

    # h2 active again: the global task is back; spread over zones with at most 2 tasks a
    # node; a task beyond that waits, saying why
    h1.cli("node", "update", "--availability", "active", h2.name)
    wait_until(lambda: len(running(h1, "agents")) == 3 or None, timeout=30, interval=0.3,
               what="the global task back on the reactivated h2")
    # zone a has two nodes, zone b one: 4 tasks spread by zone go 2 to each zone (one on
    # each node of a, both of b's on h3), which spreading over nodes alone would not do
    for h, zone in ((h1, "a"), (h2, "a"), (h3, "b")):
        h1.cli("node", "update", "--label-add", f"zone={zone}", h.name)
    h1.cli("service", "create", "--name", "web", "--replicas", "4",
           "--max-replicas-per-node", "2", "--placement-pref", "spread=node.labels.zone",
           "--", "sleep", "100000")

    def per_node() -> dict[str, int] | None:
        ps = [t for t in h1.cli_json("service", "ps", "web") if t["state"] == "running"]
        return dict(Counter(t["node"] for t in ps)) if len(ps) == 4 else None

    assert wait_until(per_node, timeout=30, interval=0.3, what="web's 4 tasks") == \
        {h1.name: 1, h2.name: 1, h3.name: 2}
    h1.cli("service", "scale", "web=7")

    def waiting() -> str | None:
        ps = h1.cli_json("service", "ps", "web")
        pending = [t for t in ps if t["state"] == "pending"]
        return pending[0]["message"] if len(pending) == 1 and \
            sum(t["state"] == "running" for t in ps) == 6 else None

    assert wait_until(waiting, timeout=30, interval=0.3, what="one task of 7 pending") == \
        "no suitable node (max replicas per node (2) 3/3)"
    assert Counter(t["node"] for t in h1.cli_json("service", "ps", "web")
                   if t["state"] == "running") == {h1.name: 2, h2.name: 2, h3.name: 2}
    assert "no suitable node (max replicas per node (2) 3/3)" in \
        h1.cli("service", "ps", "web").stdout  # (the table says why, too)


def _batch_and_cron(h1: Host, out: Path) -> None:
    """Must-show 4's jobs: a replicated-job of 6 completions at most 2 at a time completes
    and is not restarted; a job scheduled every 3 s (cron with seconds) runs on its times,
    a time that comes while its run (4 s long) still goes is skipped (policy forbid), and
    the runs are kept in `service inspect` and the next one shown by `service ls`."""
    mount = f"type=bind,src={out},dst=/out"
    note = "echo start $(date +%s.%N) >> /out/$0; sleep 1; echo end $(date +%s.%N) >> /out/$0"
    h1.cli("service", "create", "--name", "batch", "--mode", "replicated-job",
           "--replicas", "6", "--max-concurrent", "2", "--restart-delay", "0s",
           "--mount", mount, "--", "sh", "-c", note, "batch")
    h1.cli("service", "create", "--name", "tick", "--mode", "replicated-job",
           "--schedule", "*/3 * * * * *", "--schedule-policy", "forbid",
           "--schedule-history", "10", "--mount", mount, "--", "sh", "-c",
           "echo run $(date +%s.%N) >> /out/tick; sleep 4")
    most = 0

    def done() -> dict[str, Any] | None:
        nonlocal most
        ps = h1.cli_json("service", "ps", "batch")
        most = max(most, sum(t["state"] == "running" for t in ps))
        (svc,) = [s for s in h1.cli_json("service", "ls") if s["name"] == "batch"]
        return svc if svc["completed"] == 6 else None

    svc = wait_until(done, timeout=90, interval=0.2, what="the job's 6 completions")
    assert (svc["mode"], svc["replicas"], svc["failed"]) == ("replicated-job", 6, 0)
    assert 1 <= most <= 2
    events = sorted((float(at), +1 if what == "start" else -1) for what, at in
                    (line.split() for line in (out / "batch").read_text().splitlines()))
    assert len(events) == 12  # 6 tasks ran, each once
    at_once = max(itertools.accumulate(step for _, step in events))
    assert at_once == 2, f"{at_once} job tasks ran at once (max-concurrent 2)"
    time.sleep(2)  # a completed job is not restarted
    ps = h1.cli_json("service", "ps", "batch")
    assert sorted(t["state"] for t in ps) == ["complete"] * 6
    assert sorted(t["slot"] for t in ps) == [1, 2, 3, 4, 5, 6]
    assert len((out / "batch").read_text().splitlines()) == 12
    table = h1.cli("service", "ls").stdout
    assert "global" in table and "2/2" in table
    assert "replicated-job" in table and "0/0 (6/6 completed)" in table  # (docker's)

    def runs() -> list[dict[str, Any]] | None:
        (view,) = h1.cli_json("service", "inspect", "tick")
        kept = view["schedule"]["runs"]
        started = [r for r in kept if r["state"] != "skipped"]
        ended = [r for r in started if r["state"] == "completed"]
        skipped = [r for r in kept if r["state"] == "skipped"]
        return kept if len(ended) >= 2 and skipped else None

    kept = wait_until(runs, timeout=90, interval=1, what="2 runs of the cron job and a skip")
    assert all(r["scheduled_at"] % 3 == 0 for r in kept)  # on its times
    assert all("still running (policy forbid)" in r["message"] for r in kept
               if r["state"] == "skipped")
    done_runs = [r for r in kept if r["state"] == "completed"]
    assert all(r["completed"] == 1 and r["failed"] == 0 for r in done_runs)
    spans = sorted((r["started_at"], r["finished_at"] or float("inf")) for r in kept
                   if r["state"] != "skipped")
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # forbid: no overlap
    starts = (out / "tick").read_text().splitlines()
    assert len(starts) >= len(done_runs)  # each run's task really ran
    tick = next(line for line in h1.cli("service", "ls").stdout.splitlines() if "tick" in line)
    assert "next run" in tick
    h1.cli("service", "rm", "tick")
