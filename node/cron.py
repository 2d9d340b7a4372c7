"""Scheduled jobs (beyond Swarm; Nomad's periodic jobs): when a job's next run is due, and
how each run is doing. Pure functions; the leader runs ``plan`` in every pass.

Owns: the decisions of a job's ``mode.schedule`` (shoal.raft.spec.Schedule):

* a run is due at the latest time the cron expression gives after the last scheduled run
  (``JobStatus.last_scheduled``, in Raft) and not after now; a run missed while no leader
  was there is started once, late, for the latest missed time. The service's creation time
  bounds it from below (a job created at 10:30 with @hourly first runs at 11:00);
* policy ``forbid``: a run due while the previous one is still going is recorded as skipped;
  ``allow``: it starts anyway, the previous one runs on; ``replace``: it starts, and the
  orchestrator stops the previous one's tasks (``_job_iteration``), which then fails;
* ``starting_deadline``: a run found due later than that after its time (missed while no
  leader was there) is recorded as skipped instead of started;
* a run is *running* while one of its tasks is alive or one of its slots (global-job: nodes)
  will still get a task; *completed* once every slot has a task that exited 0; *failed*
  when a slot will not be retried any more (restart policy), or — for a run superseded by a
  later one (policy allow) — when its slots not yet done never will be.

What it returns are ops of the leader's term-fenced batch, applied by shoal.raft.state:
("job_run", service_id, scheduled_at, skip_reason) starts (or skips) the run of that time —
the state machine takes it only if ``scheduled_at`` is later than the last one, so a leader
change (or a retried batch) neither loses nor doubles a run — and ("job_run_status",
service_id, iteration, state, completed, failed, message) records a run's progress. The
orchestrator runs the tasks of the current iteration (shoal.node.orchestrator
``of_current_run``). Must not touch: the store, the network, the clock (``now`` is given).
"""

from __future__ import annotations

import datetime
import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from shoal.node.orchestrator import eligible_nodes
from shoal.node.rollout import Op, restart_decision
from shoal.raft.models import JobRun, Node, Service, Task, TaskState
from shoal.raft.spec import Schedule, parse_cron
from shoal.raft.state import Snapshot

RUNNING, COMPLETED, FAILED, SKIPPED = "running", "completed", "failed", "skipped"


def next_time(schedule: Schedule, after: float) -> float:
    """The first time the schedule gives strictly after ``after`` (wall-clock seconds)."""
    it = parse_cron(schedule.cron, schedule.timezone, after)
    t = float(it.get_next(float))
    while _repeated(schedule, t):
        t = float(it.get_next(float))
    return t


def _repeated(schedule: Schedule, t: float) -> bool:
    """Whether ``t`` is the second pass of a local time the clocks went back over (the DST
    fall-back night) and the schedule is a fixed-time one — its minute and hour fields both
    given, not ``*``: as Vixie cron, a job at 02:30 runs once that night, at the first
    02:30; one of every hour (``0 * * * *``) runs in each real hour."""
    if not schedule.timezone:
        return False
    fields = schedule.cron.split()
    if schedule.cron.startswith("@"):
        fixed = schedule.cron.lower() not in ("@hourly",)
    else:
        minute, hour = fields[-5], fields[-4]  # (6 fields: the seconds first)
        fixed = not minute.startswith("*") and not hour.startswith("*")
    if not fixed:
        return False
    import zoneinfo

    local = datetime.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(schedule.timezone))
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


@functools.lru_cache(maxsize=4096)
def _next_cached(schedule: Schedule, after: float) -> float:
    """``next_time`` remembered: a pass asks each scheduled job for the time after its last
    run, the same question until the next run (parsing costs ~1 ms)."""
    return next_time(schedule, after)


def due_time(schedule: Schedule, since: float, now: float) -> float | None:
    """The latest time the schedule gives in ``(since, now]``, or None: the run to start."""
    if now <= since:
        return None
    it = parse_cron(schedule.cron, schedule.timezone, now)
    latest = float(it.get_prev(float))
    while _repeated(schedule, latest):
        latest = float(it.get_prev(float))
    if latest <= now and next_time(schedule, latest) <= now:  # (now itself is a fire time)
        latest = next_time(schedule, latest)
    return latest if latest > since else None


def iso(ts: float) -> str:
    """``ts`` as a readable UTC time for messages (2026-12-04T21:00:05Z)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_progress(svc: Service, run: JobRun, tasks: Iterable[Task],
                 nodes: Mapping[str, Node], now: float, latest: bool
                 ) -> tuple[str, int, int, str]:
    """``(state, completed, failed, message)`` of one run, from its tasks (those carrying
    its iteration). ``latest``: the run is the job's current iteration (only its failed
    slots are retried and its missing ones created)."""
    mine = [t for t in tasks if t.job_iteration == run.iteration]
    completed = sum(1 for t in mine if t.status.state is TaskState.COMPLETE)
    failed = sum(1 for t in mine if t.status.state in (TaskState.FAILED, TaskState.REJECTED))
    if any(t.alive for t in mine):
        return RUNNING, completed, failed, ""
    mode = svc.spec.mode
    units: dict[Any, list[Task]] = defaultdict(list)
    for t in mine:
        units[t.node_id if mode.per_node else t.slot].append(t)
    wanted: set[Any]
    if mode.per_node:
        wanted = set(units) | (set(eligible_nodes(svc, nodes)) if latest else set())
    else:
        wanted = set(range(1, mode.replicas + 1))
    undone = sorted((u for u in wanted
                     if not any(t.status.state is TaskState.COMPLETE for t in units.get(u, ()))),
                    key=str)
    if not undone:
        return COMPLETED, completed, failed, f"{completed} completed"
    if not latest:
        how = "replaced by a later run (policy replace)" if mode.schedule.policy == "replace" \
            else "superseded by a later run"
        return FAILED, completed, failed, f"{how} with {len(undone)} task(s) not completed"
    for u in undone:
        ended = [t for t in units.get(u, ()) if t.status.state.terminal]
        if not ended:
            return RUNNING, completed, failed, ""  # (its task is still to be made)
        restart, _ = restart_decision(svc.spec.task.restart, ended, now, job=True)
        if restart:
            return RUNNING, completed, failed, ""
    return FAILED, completed, failed, \
        f"{len(undone)} task(s) failed and will not be retried (restart policy)"


def plan(snap: Snapshot, now: float) -> tuple[list[Op], float | None]:
    """The scheduled jobs' ops for this leader pass, and the next time a run is due (wall
    clock; None when no job is scheduled)."""
    scheduled = [s for s in snap.services.values() if s.spec.mode.scheduled]
    if not scheduled:
        return [], None
    # (the tasks are needed only for runs still going: a pass over idle schedules costs a
    # look at each service, not at the task table)
    ids = {s.id for s in scheduled if any(r.state == RUNNING for r in s.job_status.runs)}
    by_service: dict[str, list[Task]] = defaultdict(list)
    for t in snap.tasks.values() if ids else ():
        if t.service_id in ids:
            by_service[t.service_id].append(t)
    ops: list[Op] = []
    wake_at: float | None = None
    for svc in sorted(scheduled, key=lambda s: s.spec.name):
        svc_ops, nxt = _plan_one(svc, by_service.get(svc.id, []), snap.nodes, now)
        ops += svc_ops
        if nxt is not None:
            wake_at = nxt if wake_at is None else min(wake_at, nxt)
    return ops, wake_at


def _plan_one(svc: Service, tasks: list[Task], nodes: Mapping[str, Node], now: float
              ) -> tuple[list[Op], float | None]:
    """One scheduled job's ops (the progress of its runs going, the run due now) and the
    next time it is due (None: its schedule gives no more times)."""
    ops: list[Op] = []
    sched, job = svc.spec.mode.schedule, svc.job_status
    current_running = False
    for run in job.runs:
        if run.state != RUNNING:
            continue
        latest = run.iteration == job.iteration
        progress = run_progress(svc, run, tasks, nodes, now, latest)
        if latest and progress[0] == RUNNING:
            current_running = True
        if progress != (run.state, run.completed, run.failed, run.message):
            ops.append(("job_run_status", svc.id, run.iteration, *progress))
    since = max(job.last_scheduled, svc.created_at)
    before = svc.previous_spec
    if before is not None and before.mode.schedule != sched:  # (edited: none for times before)
        since = max(since, svc.updated_at)
    try:
        nxt = _next_cached(sched, since)  # (the same every pass until a run: cached)
        due = due_time(sched, since, now) if nxt <= now else None
        if due is not None:
            nxt = _next_cached(sched, due)
    except ValueError:  # (croniter: no such time within its search: it never runs again)
        return ops, None
    if due is not None:
        skip = ""
        if sched.starting_deadline and now - due > sched.starting_deadline:
            skip = f"not started {now - due:.0f}s after its time, past its starting " \
                   f"deadline ({sched.starting_deadline:g}s)"
        elif sched.policy == "forbid" and current_running:
            prev = next(r for r in reversed(job.runs) if r.iteration == job.iteration)
            skip = f"the previous run (scheduled {iso(prev.scheduled_at)}) is still " \
                   "running (policy forbid)"
        ops.append(("job_run", svc.id, due, skip))
    return ops, nxt


__all__ = ["due_time", "iso", "next_time", "plan", "run_progress"]
