"""Multi-process gossip clusters on loopback, for integration tests and benchmarks.

Owns the scaffolding around ``python -m shoal.gossip`` processes: start them with a shared key
file, read the JSON event lines they print (one reader thread per process), rebuild every
process's membership view from those lines, and kill every process it started, by PID, in
``cleanup()`` (always call it: use ``with ProcessCluster(...) as cluster``). It must not touch
processes it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Proc:
    """One member process."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen
        self.port = 0
        self.killed_wall = 0.0  # time.time() of the last kill(), to compare with events' "t"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class ProcessCluster:
    """Member processes and the events they print, in arrival order."""

    def __init__(
        self, workdir: Path, *, preset: str = "local", extra_args: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.preset = preset
        self.extra_args = list(extra_args or [])
        self.key_file = workdir / "cluster.key"
        self.key_file.write_text(os.urandom(32).hex())
        self.procs: dict[str, Proc] = {}
        self.events: list[dict[str, Any]] = []
        self._views: dict[str, dict[str, str]] = {}  # observer -> member -> state (live)
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self._all_popens: list[subprocess.Popen[str]] = []

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- processes ------------------------------------------------------------------------
    def spawn(
        self, name: str, seeds: list[str], *, port: int = 0, wrapper: list[str] | None = None
    ) -> Proc:
        """Start member ``name`` joining through ``seeds``. ``wrapper`` prefixes the command
        (e.g. ``["taskset", "-c", "1"]``)."""
        cmd = [
            *(wrapper or []), sys.executable, "-m", "shoal.gossip", "--name", name,
            "--bind", f"127.0.0.1:{port}", "--key-file", str(self.key_file),
            "--preset", self.preset, "--loop", "uvloop", *self.extra_args,
        ]
        for seed in seeds:
            cmd += ["--seed", seed]
        with open(self.workdir / f"{name}.err", "a") as err:
            popen = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True
            )
        self._all_popens.append(popen)
        with self.lock:
            self._views.pop(name, None)  # a restarted member starts with an empty view
        proc = Proc(name, popen)
        self.procs[name] = proc
        thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        thread.start()
        self.threads.append(thread)
        return proc

    def start(
        self, n: int, *, timeout: float = 30.0, batch: int = 0, pause: float = 0.0
    ) -> None:
        """Start p0, then p1..p(n-1), and wait until all see all.

        ``batch`` = 0 starts them all at once seeded with p0. ``batch`` = k staggers the starts
        (large clusters on a small machine): k processes at a time, each seeded with up to
        three random members already running, waiting until the batch is ready and then
        ``pause`` seconds before the next one.
        """
        first = self.spawn("p0", [])
        self.wait_for(lambda: first.port != 0, timeout, "p0 to be ready")
        if batch <= 0:
            for i in range(1, n):
                self.spawn(f"p{i}", [first.address])
        else:
            rng = random.Random(n)
            for lo in range(1, n, batch):
                ready = [p.address for p in self.procs.values() if p.port]
                started = [
                    self.spawn(f"p{i}", rng.sample(ready, min(3, len(ready))))
                    for i in range(lo, min(lo + batch, n))
                ]

                def batch_ready(batch_procs: list[Proc] = started) -> bool:
                    return all(p.port for p in batch_procs)

                self.wait_for(batch_ready, timeout, f"p{lo}.. to be ready")
                time.sleep(pause)
        self.wait_for(self.converged, timeout, f"{n} processes to converge")

    def _read(self, proc: Proc) -> None:
        stdout = proc.popen.stdout
        if stdout is None:
            return
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_at"] = time.monotonic()
            with self.lock:
                kind = event.get("event")
                if kind == "ready":
                    proc.port = int(event["port"])
                elif "name" in event and kind not in ("stats", "exit", "error"):
                    view = self._views.setdefault(str(event["node"]), {})
                    if kind == "reaped":
                        view.pop(event["name"], None)
                    else:
                        view[event["name"]] = event["state"]
                self.events.append(event)

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> float:
        """SIGKILL ``name`` and reap it; returns the monotonic time of the kill."""
        proc = self.procs[name]
        at = time.monotonic()
        proc.killed_wall = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)
        return at

    def cleanup(self) -> None:
        """Kill (by PID) every process this cluster started and reap it."""
        for popen in self._all_popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGCONT)
                    os.kill(popen.pid, signal.SIGKILL)
        for popen in self._all_popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
            if popen.stdout is not None:
                popen.stdout.close()
        for thread in self.threads:
            thread.join(timeout=5)

    # --- observation ----------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)
        return time.monotonic() - start

    def views(self) -> dict[str, dict[str, str]]:
        """observer -> member -> state, from the latest event each observer printed."""
        with self.lock:
            return {observer: dict(view) for observer, view in self._views.items()}

    def running(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.popen.poll() is None]

    def all_see(self, subject: str, state: str) -> bool:
        """Every running process other than ``subject`` sees it in ``state``."""
        views = self.views()
        return all(views.get(o, {}).get(subject) == state for o in self.running() if o != subject)

    def converged(self) -> bool:
        """Every running process sees exactly the running processes alive."""
        live = set(self.running())
        views = self.views()
        return all(
            {m for m, st in views.get(o, {}).items() if st == "alive"} == live for o in live
        )

    def events_about(self, subject: str, kind: str, since: float = 0.0) -> list[dict[str, Any]]:
        """Events of ``kind`` about ``subject`` printed by other processes since ``since``."""
        with self.lock:
            return [
                e
                for e in self.events
                if e.get("name") == subject
                and e.get("event") == kind
                and e["_at"] >= since
                and e.get("node") != subject
            ]

    def last_stats(self) -> dict[str, dict[str, int]]:
        """The latest "stats" line of each process (printed on SIGUSR1 and at exit)."""
        out: dict[str, dict[str, int]] = {}
        with self.lock:
            for ev in self.events:
                if ev.get("event") == "stats":
                    out[ev["node"]] = ev["stats"]
        return out
