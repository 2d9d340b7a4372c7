"""The fault suite's history checker: pure functions over recorded operations.

Owns: the operation record (``Op``: invoke/complete times, ``ok``/``fail``/``info``), the
set check (no acknowledged create lost, none invented, and every linearizable list read
consistent with the creates around it), the per-service register check (a
Wing-Gong-Lowe search, as in Knossos/porcupine, per key over a bounded history) and the
printing of the minimal history around a violation. Used by tests/jepsen.py and unit-tested
on hand-made histories in tests/test_faults_checker.py.

Must not touch: the lab, the network, clocks (times are whatever the recorder wrote).

Model of a register (one per service): its state is ``(version, replicas)``.
``read`` returns the state; ``cas(expected_version, replicas)`` succeeds iff the version is
``expected_version`` and then sets the replicas, raising the version by one unless the
replicas were already that value (shoal's state machine leaves an unchanged spec alone).
A ``fail`` op did not happen (the cluster refused it definitely); an ``info`` op (timeout,
503, lost connection) may have happened at any moment after its invocation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

INF = math.inf
State = tuple[int, int]  # (version, replicas)


@dataclass
class Op:
    """One client operation. ``result`` "ok" | "fail" | "info" (unknown); ``complete`` is
    INF for an unknown outcome."""

    process: int
    f: str  # create | cas | read | list
    key: str  # service name (create, cas, read), "" for list
    value: Any  # create: None; cas: (expected_version, replicas); read: (v, r); list: names
    invoke: float
    complete: float = INF
    result: str = "info"
    node: str = ""
    error: str = ""

    def line(self) -> str:
        end = "   ...  " if self.complete == INF else f"{self.complete:8.3f}"
        err = f"  ({self.error})" if self.error else ""
        val = self.value if self.f != "list" else f"{len(self.value or [])} names"
        return (f"  p{self.process:<2} {self.invoke:8.3f} → {end} {self.result:4} {self.f:6} "
                f"{self.key:12} {val} @{self.node}{err}")


# --------------------------------------------------------------------------- set

@dataclass
class SetResult:
    acknowledged: int
    unknown: int
    lost: list[str]  # acknowledged creates missing from the final state
    invented: list[str]  # final names nobody tried to create
    read_violations: list[str] = field(default_factory=list)  # list reads out of order

    @property
    def ok(self) -> bool:
        return not (self.lost or self.invented or self.read_violations)


def check_set(ops: Sequence[Op], final: Iterable[str], preexisting: Iterable[str] = ()
              ) -> SetResult:
    """Creates as a grow-only set: every acknowledged create is in ``final`` and ``final``
    holds nothing that was not created (or there before the history); each ok list read
    holds every create acknowledged before it began and nothing invoked after it ended."""
    creates = [o for o in ops if o.f == "create"]
    acked = {o.key for o in creates if o.result == "ok"}
    tried = {o.key for o in creates if o.result != "fail"}
    before = set(preexisting)
    final_set = set(final)
    lost = sorted(acked - final_set)
    invented = sorted(final_set - tried - before)
    problems: list[str] = []
    for r in ops:
        if r.f != "list" or r.result != "ok":
            continue
        names = set(r.value or ())
        missing = sorted(o.key for o in creates
                         if o.result == "ok" and o.complete < r.invoke and o.key not in names)
        if missing:
            problems.append(f"read p{r.process} at {r.invoke:.3f} misses {missing[:5]} "
                            "acknowledged before it began (stale read)")
        possible = {o.key for o in creates if o.result != "fail" and o.invoke < r.complete}
        extra = sorted(names - possible - before)
        if extra:
            problems.append(f"read p{r.process} at {r.invoke:.3f} holds {extra[:5]} that no "
                            "create invoked before it ended")
    return SetResult(len(acked), sum(1 for o in creates if o.result == "info"), lost,
                     invented, problems)


# --------------------------------------------------------------------------- registers

def _step(state: State, op: Op) -> State | None:
    """The register after ``op`` from ``state``, or None if ``op`` cannot happen there."""
    version, replicas = state
    if op.f == "read":
        return state if tuple(op.value) == state else None
    expected, new = op.value[0], op.value[1]
    if version != expected:
        return None
    after = (version, replicas) if new == replicas else (version + 1, new)
    if op.result == "ok" and len(op.value) > 2 and op.value[2] is not None \
            and op.value[2] != after[0]:
        return None  # the reply named another resulting version
    return after


@dataclass
class RegisterResult:
    key: str
    ok: bool
    ops: int
    explored: int
    stuck: Op | None = None  # the first op no order could place
    window: list[Op] = field(default_factory=list)  # the minimal history around it
    bounded: bool = False  # the search gave up (too many states): not a proof either way

    def report(self) -> str:
        if self.ok:
            return f"register {self.key}: linearizable ({self.ops} ops)"
        head = (f"register {self.key}: search bound hit after {self.explored} states "
                "(inconclusive)" if self.bounded else
                f"register {self.key}: NOT linearizable; no order places:")
        lines = [head]
        if self.stuck is not None:
            lines.append(self.stuck.line())
            lines.append("  history around it (ops overlapping it, by invocation):")
        lines += [o.line() for o in self.window]
        return "\n".join(lines)


def check_register(key: str, ops: Sequence[Op], initial: State,
                   max_states: int = 200_000) -> RegisterResult:
    """Is there a total order of the key's operations, consistent with real time (an op
    that completed before another was invoked comes first), that the register model
    accepts, containing every ok op and any subset of the unknown ones?

    Wing-Gong-Lowe depth-first search with a cache of (linearized set, state). An unknown
    cas whose expected version the register has passed can never apply any more and is
    dropped from the search, which keeps the cache small with many timeouts."""
    hist = sorted((o for o in ops if o.result != "fail" and not (
        o.f == "read" and o.result != "ok")), key=lambda o: o.invoke)
    n = len(hist)
    required = 0
    for i, o in enumerate(hist):
        if o.result == "ok":
            required |= 1 << i
    seen: set[tuple[int, State]] = set()
    stack: list[tuple[int, State, int]] = [(0, initial, 0)]
    best_done, best_mask = -1, 0
    explored = 0
    total = bin(required).count("1")
    while stack:
        mask, state, done = stack.pop()
        # the window: ops from the first one not yet placed, while invoked before every
        # pending ok op completed (everything earlier is placed; later ones cannot go next)
        first = (~mask & (mask + 1)).bit_length() - 1
        horizon, end = INF, first
        while end < n and hist[end].invoke <= horizon:
            o = hist[end]
            if not mask >> end & 1:
                if o.result == "info" and o.f == "cas" and o.value[0] < state[0]:
                    mask |= 1 << end  # an unknown cas whose version has passed: never
                elif o.result == "ok":
                    horizon = min(horizon, o.complete)
            end += 1
        if (mask, state) in seen:
            continue
        seen.add((mask, state))
        explored += 1
        if explored > max_states:
            return RegisterResult(key, False, n, explored, bounded=True)
        if done == total:
            return RegisterResult(key, True, n, explored)
        if done > best_done:
            best_done, best_mask = done, mask
        for i in range(end - 1, first - 1, -1):
            o = hist[i]
            if mask >> i & 1 or o.invoke > horizon:
                continue
            after = _step(state, o)
            if after is not None:
                stack.append((mask | 1 << i, after, done + (o.result == "ok")))
    pending = [hist[i] for i in range(n) if required >> i & 1 and not best_mask >> i & 1]
    stuck = min(pending, key=lambda o: o.complete) if pending else None
    window: list[Op] = []
    if stuck is not None:
        lo, hi = stuck.invoke, stuck.complete
        # (unknown ops never complete: only those invoked shortly before are shown)
        window = [o for o in hist if o.invoke <= hi and o.complete >= lo
                  and (o.complete != INF or o.invoke >= lo - 10.0)]
        # plus the last ok op before it: what the register held
        before = [o for o in hist if o.complete < lo and o.result == "ok"]
        window = sorted(before[-3:] + window, key=lambda o: o.invoke)
    return RegisterResult(key, False, n, explored, stuck, window)


__all__ = ["INF", "Op", "RegisterResult", "SetResult", "check_register", "check_set"]
