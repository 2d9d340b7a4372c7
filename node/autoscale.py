"""Horizontal autoscaling on CPU and memory (Kubernetes' HPA rule), run by the leader.

Owns: the pure decision ``decide`` (a service's autoscale spec, its current replicas, the
measured tasks' usage, the recommendations of the stabilisation window → the new replica
count and why), the usage arithmetic (``cpu_usage``/``memory_usage`` over a window of
cgroup samples, as a fraction of each task's limit, else reservation, else 1 CPU), and
``Autoscaler``, the leader-side sampler that asks the nodes for their tasks' usage (through
an injected ``usage`` function: shoal.node.transfer.cluster_usage in the agent) and turns
decisions into ``("autoscale", service_id, replicas, decision)`` ops of the leader's
term-fenced batch (applied by shoal.raft.state as an ordinary replica change, the decision
recorded in ``Service.autoscale``). Must not touch: the store (ops are returned), the
runtime; the clock is given.

The rule (HPA's): ratio = usage / target; within ``tolerance`` of 1 → no change; else
desired = ceil(current * ratio). Tasks not measured (starting, unhealthy, too new for two
samples) count as 0 % when scaling up and as the target when scaling down, so a scale-up
that is still starting does not scale up again and a scale-down is never based on guesses.
Several metrics: the largest recommendation wins. Then the scale-down stabilisation: the
highest recommendation of the last ``stabilization`` seconds (so a dip does not remove
tasks at once, and noise cannot make it flap), the step limit per period, and the clamp to
[min, max]. Recommendations and samples live in the leader's memory (as in HPA's
controller): a new leader starts a fresh window.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.raft.models import Service, Task, TaskState
from shoal.raft.schema import GATED_OPS, LEGACY
from shoal.raft.spec import Autoscale, TaskSpec
from shoal.raft.state import Snapshot

log = logging.getLogger("shoal.autoscale")

Op = tuple[Any, ...]
UsageFn = Callable[[dict[str, list[str]]], Awaitable[dict[str, dict[str, Any]]]]


@dataclass(frozen=True)
class Sample:
    """One reading of a task's cgroups (``at``: the leader's monotonic clock)."""

    at: float
    cpu_seconds: float | None
    memory_bytes: int | None


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    usage: float = -1.0  # of the metric that decided; -1 = none measured
    target: float = 0.0
    metric: str = "cpu"
    tasks: int = 0


def cpu_capacity(spec: TaskSpec) -> float:
    """CPUs a task's usage is a fraction of: its limit, else reservation, else 1."""
    res = spec.resources
    return res.limits.cpu or res.reservations.cpu or 1.0


def memory_capacity(spec: TaskSpec) -> int:
    res = spec.resources
    return res.limits.memory or res.reservations.memory


def window_of(samples: Iterable[Sample], window: float, now: float) -> list[Sample]:
    """The samples of the last ``window`` seconds, plus the one just before (the start)."""
    all_ = list(samples)
    inside = [s for s in all_ if s.at >= now - window]
    before = [s for s in all_ if s.at < now - window]
    return ([before[-1]] if before else []) + inside


def cpu_usage(samples: Iterable[Sample], window: float, now: float, capacity: float
              ) -> float | None:
    """Average CPU over the window as a fraction of ``capacity``; None without two samples."""
    ss = [s for s in window_of(samples, window, now) if s.cpu_seconds is not None]
    if len(ss) < 2 or ss[-1].at - ss[0].at <= 0:
        return None
    first, last = ss[0], ss[-1]
    assert first.cpu_seconds is not None and last.cpu_seconds is not None
    rate = max(0.0, last.cpu_seconds - first.cpu_seconds) / (last.at - first.at)
    return rate / capacity


def memory_usage(samples: Iterable[Sample], window: float, now: float, capacity: int
                 ) -> float | None:
    ss = [s.memory_bytes for s in window_of(samples, window, now)
          if s.memory_bytes is not None]
    if not ss or capacity <= 0:
        return None
    return sum(ss) / len(ss) / capacity


def recommend(current: int, usages: list[float], target: float, tolerance: float
              ) -> tuple[int, float]:
    """HPA's rule for one metric: (recommended replicas, the ratio used). ``usages``: the
    measured tasks' (fractions); the ``current - len(usages)`` others are unmeasured."""
    if not usages or target <= 0 or current <= 0:
        return current, 1.0
    measured = len(usages)
    ratio = sum(usages) / measured / target
    missing = max(0, current - measured)
    if missing and abs(ratio - 1) > tolerance:
        # unmeasured tasks: 0 % when scaling up, the target when scaling down (HPA)
        fill = 0.0 if ratio > 1 else target
        adjusted = (sum(usages) + fill * missing) / current / target
        if (adjusted > 1) != (ratio > 1):
            return current, adjusted  # (the direction changed: no change)
        ratio = adjusted
    if abs(ratio - 1) <= tolerance:
        return current, ratio
    return max(1, math.ceil(current * ratio - 1e-9)), ratio


def decide(auto: Autoscale, current: int, cpu: list[float], memory: list[float],
           history: Iterable[tuple[float, int]], now: float) -> tuple[Decision, int]:
    """The replicas a service should run, and the raw recommendation to remember for the
    stabilisation window (``history``: (time, recommendation) of earlier decisions)."""
    recs: list[tuple[int, str, float, float, int]] = []  # (replicas, metric, usage, target, n)
    for metric, usages, target in (("cpu", cpu, auto.cpu), ("memory", memory, auto.memory)):
        if target > 0 and usages:
            rec, _ = recommend(current, usages, target, auto.tolerance)
            recs.append((rec, metric, sum(usages) / len(usages), target, len(usages)))
    if not recs:
        clamped = min(max(current, auto.min), auto.max)
        why = "no usage measured yet" if clamped == current else \
            f"clamped to [{auto.min}, {auto.max}], no usage measured yet"
        return Decision(desired=clamped, reason=why, target=auto.cpu or auto.memory), current
    rec, metric, usage, target, n = max(recs, key=lambda r: r[0])
    what = f"{metric} {usage:.0%} of target {target:.0%} over {n} task(s)"
    # scale-down stabilisation: the highest recommendation of the window (this one included)
    recent = [r for t, r in history if t >= now - auto.stabilization] + [rec]
    desired, reason = current, f"{what}: within tolerance"
    if rec > current:
        desired, reason = rec, f"{what}: scale up"
    elif rec < current:
        top = max(recent)
        desired = min(current, top)
        reason = f"{what}: scale down" if desired == rec else \
            f"{what}: scale down held at {desired} (highest recommendation in the " \
            f"{auto.stabilization:g}s stabilisation window)"
    up_limit = current + (auto.step or max(4, current))
    down_limit = current - auto.step if auto.step else 0
    if desired > up_limit:
        desired, reason = up_limit, f"{reason} (limited to +{up_limit - current} per period)"
    if desired < down_limit:
        desired, reason = down_limit, f"{reason} (limited to -{auto.step} per period)"
    if desired > auto.max:
        desired, reason = auto.max, f"{reason} (clamped to max {auto.max})"
    if desired < auto.min:
        desired, reason = auto.min, f"{reason} (clamped to min {auto.min})"
    return Decision(desired=desired, reason=reason, usage=round(usage, 4), target=target,
                    metric=metric, tasks=n), rec


def counted(t: Task) -> bool:
    """A task whose usage counts: running, past its start (healthy, or without a check)."""
    return t.desired_state == TaskState.RUNNING and t.status.up and bool(t.node_id)


@dataclass
class _ServiceState:
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    last_decision: float = 0.0
    first_seen: float = 0.0


class Autoscaler:
    """The leader's sampler and decision maker. ``plan`` is called in every leader pass; it
    samples the autoscaled services' tasks at most every ``sample_every`` seconds (and a
    service's window / 4) and decides once per ``period``."""

    def __init__(self, usage: UsageFn, sample_every: float = 2.0,
                 wait_for_sample: float = 0.25) -> None:
        self.usage = usage
        self.sample_every = sample_every  # seconds between two readings of the tasks' usage
        self.wait_for_sample = wait_for_sample  # a pass waits this long for a reading
        self.samples: dict[str, deque[Sample]] = {}
        self.services: dict[str, _ServiceState] = {}
        self.last_sample = -math.inf
        # a reading under way: a pass waits for it briefly, never for a slow node's timeout
        self._inflight: asyncio.Future[None] | None = None

    async def plan(self, snap: Snapshot, mono: float) -> list[Op]:
        gated = getattr(snap.cluster, "schema", LEGACY) < GATED_OPS["autoscale"]
        autos = {} if gated else {  # (gated: an older node would refuse the op)
            s.id: s for s in snap.services.values() if s.spec.mode.autoscale.enabled}
        for sid in list(self.services):
            if sid not in autos:
                del self.services[sid]
        if not autos:
            self.samples.clear()
            return []
        tasks: dict[str, list[Task]] = {sid: [] for sid in autos}
        for t in snap.tasks.values():
            if t.service_id in tasks and counted(t):
                tasks[t.service_id].append(t)
        every = min([self.sample_every] + [s.spec.mode.autoscale.window / 4
                                           for s in autos.values()])
        if mono - self.last_sample >= every and (self._inflight is None
                                                 or self._inflight.done()):
            self.last_sample = mono
            self._inflight = asyncio.ensure_future(self._sample(tasks, mono))
            await asyncio.wait({self._inflight}, timeout=self.wait_for_sample)
        live = {t.id for ts in tasks.values() for t in ts}
        for tid in list(self.samples):
            if tid not in live:
                del self.samples[tid]
        ops: list[Op] = []
        for sid, svc in sorted(autos.items(), key=lambda kv: kv[1].spec.name):
            op = self._decide(svc, tasks[sid], mono)
            if op is not None:
                ops.append(op)
        return ops

    async def _sample(self, tasks: Mapping[str, list[Task]], mono: float) -> None:
        by_node: dict[str, list[str]] = {}
        for ts in tasks.values():
            for t in ts:
                by_node.setdefault(t.node_id, []).append(t.id)
        if not by_node:
            return
        try:
            got = await self.usage(by_node)
        except Exception as exc:  # (a failed read only delays a decision)
            log.warning("autoscaler: reading task usage failed: %s", exc)
            return
        for tid, u in got.items():
            if not isinstance(u, dict):
                continue
            cpu, mem = u.get("cpu_seconds"), u.get("memory_bytes")
            self.samples.setdefault(tid, deque(maxlen=512)).append(Sample(
                at=mono, cpu_seconds=float(cpu) if isinstance(cpu, (int, float)) else None,
                memory_bytes=int(mem) if isinstance(mem, int) else None))

    def _decide(self, svc: Service, tasks: list[Task], mono: float) -> Op | None:
        auto = svc.spec.mode.autoscale
        st = self.services.setdefault(svc.id, _ServiceState(first_seen=mono))
        current = svc.spec.mode.replicas
        out_of_range = not auto.min <= current <= auto.max
        if not out_of_range and mono - max(st.last_decision, st.first_seen) < auto.period:
            return None
        st.last_decision = mono
        cpu: list[float] = []
        mem: list[float] = []
        for t in tasks:
            ss = self.samples.get(t.id, ())
            if auto.cpu:
                c = cpu_usage(ss, auto.window, mono, cpu_capacity(t.spec))
                if c is not None:
                    cpu.append(c)
            if auto.memory:
                m = memory_usage(ss, auto.window, mono, memory_capacity(t.spec))
                if m is not None:
                    mem.append(m)
        decision, rec = decide(auto, current, cpu, mem, st.history, mono)
        if decision.tasks:
            st.history.append((mono, rec))
        while st.history and st.history[0][0] < mono - auto.stabilization - auto.period:
            st.history.popleft()
        if decision.desired == current:
            return None
        log.info("autoscale %s: %d → %d (%s)", svc.spec.name, current, decision.desired,
                 decision.reason)
        return ("autoscale", svc.id, decision.desired,
                {"current": current, "desired": decision.desired, "usage": decision.usage,
                 "target": decision.target, "metric": decision.metric,
                 "tasks": decision.tasks, "reason": decision.reason})


__all__ = ["Autoscaler", "Decision", "Sample", "counted", "cpu_capacity", "cpu_usage",
           "decide", "memory_usage", "recommend"]
