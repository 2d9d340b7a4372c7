"""Waiting for a service to converge, with live progress (`service create|update|scale|
rollback` without ``-d``), as Docker's CLI shows it.

Owns: the wait loop (polling the service and its tasks through the API), the verdict
(converged, job complete, update paused or rolled back) and drawing it: on a terminal a live
block redrawn with rich (``overall progress: 3 out of 5 tasks``, one line per slot — per node
for global services — with the task's state and status message, such as image pull progress),
elsewhere plain lines without control codes, printed when they change. Must not touch:
cluster logic; it only reads what `service inspect`/`ps` show. rich is imported only here,
and only when stdout is a terminal.

Errors: ``CliError`` when an update pauses or rolls back (the reason from ``update_status``);
Ctrl-C stops waiting (exit 130) and says the operation goes on in the background.
"""

from __future__ import annotations

import argparse
import sys
import time

from shoal.cli.errors import CliError

TYPE_CHECKING = False  # (typing's, without importing typing: `service ls` builds our flags)
if TYPE_CHECKING:
    from typing import Any, Protocol, TextIO

    class _Api(Protocol):
        def call(self, method: str, path: str, body: Any = None) -> Any: ...

POLL = 0.25  # seconds between looks at the service (each look: two API reads)
RUNNING_UPDATE = ("updating", "rollback_started")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``-d/--detach`` and ``-q/--quiet`` of the commands that wait."""
    parser.add_argument("-d", "--detach", action="store_true",
                        help="return at once instead of waiting for the service to converge")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="wait without printing progress")


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def _slot_lines(svc: dict[str, Any], tasks: list[dict[str, Any]]) -> list[str]:
    """One line per slot (global: per node): the newest task's state and message. A
    replicated service's slots are numbered by position, 1/N to N/N, as Docker's CLI does:
    after a scale-down its slots may have holes (1, 4), and the slots going away (their
    tasks desired REMOVE; before schema 9 the highest) are not shown."""
    per_node = svc["mode"] in ("global", "global-job")
    newest: dict[Any, dict[str, Any]] = {}
    for t in tasks:
        if t["desired_state"] == "remove" and not per_node:
            continue
        key = (t["node"] or t["node_id"]) if per_node else t["slot"]
        cur = newest.get(key)
        live = t["desired_state"] in ("running", "complete")
        if cur is None or (live, t["created_at"]) > \
                (cur["desired_state"] in ("running", "complete"), cur["created_at"]):
            newest[key] = t
    total = svc["replicas"]
    if per_node:
        keys = sorted(newest, key=str)
    else:  # (the N slots with a live newest task first: an older run's ended one is not)
        keys = sorted(sorted(newest, key=lambda k: (
            newest[k]["desired_state"] not in ("running", "complete"), int(k)))[:total],
            key=int)
    out = []
    for pos, key in enumerate(keys, 1):
        t = newest[key]
        state = t["state"]
        if state == "running" and t.get("health") and t["health"] not in ("", "none"):
            state += f" ({t['health']})"
        detail = t.get("error") or (t.get("message") if t["state"] != "running" else "")
        label = f"{key}" if per_node else f"{pos}/{total}"
        out.append(f"{label}: {state}" + (f"   {detail}" if detail and detail != t["state"]
                                          else ""))
    return out


def verdict(svc: dict[str, Any], tasks: list[dict[str, Any]], op: str,
            before: dict[str, Any] | None) -> tuple[str, str]:
    """("", "") while waiting; ("ok", text) or ("fail", reason) when done. ``before``: the
    update status before an update/rollback (a status left from an earlier update is not
    this one's outcome). A paused update fails any wait (nothing converges while it is
    paused); a rollback that completed fails only the `service update` that caused it."""
    status = svc.get("update_status") or {}
    state = status.get("state", "")
    fresh = before is None or status.get("started_at") != before.get("started_at") or \
        state != before.get("state")
    reason = status.get("message") or state
    if state in ("paused", "rollback_paused"):
        return "fail", f"update paused: {reason}"
    if state == "rollback_completed" and fresh and op == "update":
        return "fail", f"update rolled back: {reason}"
    if state in RUNNING_UPDATE:
        return "", ""
    if fresh and state.endswith("completed") and "failure action continue" in reason:
        return "fail", reason  # (done, with tasks that never came up: no convergence)
    if "completed" in svc:  # a job
        if svc["completed"] >= svc["replicas"]:
            return "ok", "Job complete"
        if svc.get("job_state") == "failed":  # (every unfinished slot gave up)
            return "fail", f"job failed: {svc.get('job_message') or 'tasks failed'}"
        return "", ""
    live = [t for t in tasks if t["desired_state"] == "running"]
    leftover = [t for t in tasks if t["desired_state"] != "running"
                and t["state"] in ("assigned", "preparing", "starting", "running")]
    if svc["running"] == svc["replicas"] and len(live) == svc["replicas"] and \
            all(t["state"] == "running" for t in live) and not leftover:
        return "ok", "Service converged"
    return "", ""


class _Plain:
    """Non-terminal output: each line once, when it changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown: dict[str, str] = {}

    def show(self, head: str, lines: list[str]) -> None:
        for line in [head, *lines]:
            key = line.split(":", 1)[0]
            if self.shown.get(key) != line:
                self.shown[key] = line
                print(line, file=self.out, flush=True)

    def close(self) -> None:
        pass


class _Live:
    """Terminal output: the block redrawn in place (rich.live)."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self.live = Live(console=Console(file=out), auto_refresh=False, transient=False)
        self.live.start()

    def show(self, head: str, lines: list[str]) -> None:
        from rich.text import Text

        self.live.update(Text("\n".join([head, *lines])), refresh=True)

    def close(self) -> None:
        self.live.stop()


def wait(c: _Api, service: str, op: str, args: argparse.Namespace,
         before: dict[str, Any] | None = None, out: TextIO | None = None) -> None:
    """Wait until ``service`` converges after ``op`` (create/update/scale/rollback), drawing
    progress unless ``args.quiet``; raise CliError when the update fails."""
    out = out or sys.stdout
    quiet = getattr(args, "quiet", False)
    view: _Plain | _Live | None = None
    if not quiet:
        view = _Live(out) if out.isatty() else _Plain(out)
    try:
        while True:
            svc = c.call("GET", f"/v1/services/{_q(service)}")
            tasks = c.call("GET", f"/v1/services/{_q(service)}/tasks")
            done, text = verdict(svc, tasks, op, before)
            if view is not None:
                if "completed" in svc:
                    head = (f"job progress: {svc['completed']} out of {svc['replicas']} "
                            f"complete, {svc['failed']} failed, {svc['running']} running")
                else:
                    head = (f"overall progress: {svc['running']} out of {svc['replicas']} "
                            "tasks")
                lines = _slot_lines(svc, tasks)
                if done == "ok":
                    lines = [*lines, f"verify: {text}"]
                view.show(head, lines)
            if done == "fail":
                raise CliError(f"service {svc['name']}: {text}")
            if done == "ok":
                return
            time.sleep(POLL)
    except KeyboardInterrupt:
        if view is not None:
            view.close()
            view = None
        print("Operation continuing in background.\nUse `shoal service ps "
              f"{service}` to check progress.", file=sys.stderr)
        sys.exit(130)
    finally:
        if view is not None:
            view.close()
