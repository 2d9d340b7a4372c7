"""A continuous Raft write load against a netns cluster, and the gaps a client sees in it.

``WriteLoad`` is one client thread sending small replicated writes (``node update
--label-add``: one Raft commit each) back to back to whichever manager answers: it stays with a
manager while its writes succeed and moves on to the next one after a failure (the API said no,
did not answer in time, or its socket is gone while the agent restarts), as a user's script
with a list of managers would. Every write is recorded with its start and acknowledgement
times. The longest interval between two consecutive acknowledged writes is the cluster's write
unavailability as a client sees it.

``RestartWatch`` notes when each watched agent process exits; ``windows()`` splits the load's
time line between those restarts (each write gap belongs to the nearest restart) so a rolling
restart or upgrade can be reported per host.

Used by tests/test_ansible.py (upgrade.yml under load) and bench/agent_stop.py.

Owns: its threads and one label key (``LABEL``) on the node it writes to. Must not touch:
anything else in the cluster; it talks to the agents' unix sockets only.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers import UnixHTTPConnection

LABEL = "test.write-load"

# How a write ended (Write.outcome)
ACKED = "acked"  # 2xx: committed
ANSWERED = "answered"  # the manager answered with an error (e.g. 503 stopping, not caught up)
REFUSED = "refused"  # no connection: the agent's socket is gone or not accepting
CUT = "cut"  # connected, but the connection was closed before an answer
TIMEOUT = "timeout"  # no answer within WriteLoad.timeout


@dataclass(frozen=True)
class Write:
    manager: str  # host name of the manager asked
    started: float  # time.monotonic()
    ended: float
    outcome: str  # ACKED, ANSWERED, REFUSED, CUT or TIMEOUT
    error: str = ""  # the answer's error message, or the client-side exception

    @property
    def ok(self) -> bool:
        return self.outcome == ACKED


def post(sock: Path, path: str, body: object, timeout: float) -> tuple[str, str]:
    """POST ``body`` as JSON to an agent's unix socket: (outcome, error message)."""
    conn = UnixHTTPConnection(sock, timeout)
    try:
        try:
            conn.connect()
        except TimeoutError as exc:
            return TIMEOUT, repr(exc)
        except OSError as exc:
            return REFUSED, repr(exc)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError as exc:
            return TIMEOUT, repr(exc)
        except (OSError, http.client.HTTPException) as exc:
            return CUT, repr(exc)
    finally:
        conn.close()
    if resp.status < 300:
        return ACKED, ""
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = raw[:200].decode(errors="replace")
    return ANSWERED, f"HTTP {resp.status}: {message}"


@dataclass(frozen=True)
class Gap:
    """No write was acknowledged from ``start`` (the previous acknowledgement) to ``end``."""

    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


class WriteLoad:
    """One thread writing ``node update NODE --label-add LABEL=i`` back to back (the API
    route the CLI uses, on the manager's unix socket; how each write ended is recorded).

    ``managers`` are (name, unix socket path) pairs. ``timeout`` bounds one request, seconds:
    longer than the API's own Raft write deadline (RaftConfig.write_timeout, 5 s), so a write
    the cluster is slow to commit counts as a slow success or as the API's own failure, never
    as a client give-up. ``interval``: start a write at most every that many seconds (0: back
    to back, ~130 commits/s on a 3-manager lab, which loads both cores; a gap is then
    measured to within the interval).
    """

    def __init__(self, managers: Sequence[tuple[str, Path]], node: str,
                 timeout: float = 10.0, interval: float = 0.0) -> None:
        if not managers:
            raise ValueError("WriteLoad needs at least one manager")
        self.managers = list(managers)
        self.node = node
        self.timeout = timeout
        self.interval = interval
        self.writes: list[Write] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="write-load", daemon=True)

    def _run(self) -> None:
        k = i = 0
        while not self._stop.is_set():
            name, sock = self.managers[k % len(self.managers)]
            i += 1
            t0 = time.monotonic()
            outcome, error = post(sock, f"/v1/nodes/{self.node}",
                                  {"label_add": {LABEL: str(i)}}, self.timeout)
            self.writes.append(Write(name, t0, time.monotonic(), outcome, error))
            if outcome != ACKED:
                k += 1  # the next manager
                self._stop.wait(0.02)  # not a busy loop while every manager refuses
            elif self.interval:
                self._stop.wait(max(0.0, t0 + self.interval - time.monotonic()))

    def start(self) -> WriteLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)

    def __enter__(self) -> WriteLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results ------------------------------------------------------------------------

    @property
    def acked(self) -> list[float]:
        return [w.ended for w in self.writes if w.ok]

    def gaps(self) -> list[Gap]:
        """Intervals between consecutive acknowledged writes, in time order."""
        acks = self.acked
        return [Gap(a, b) for a, b in itertools.pairwise(acks)]


class RestartWatch:
    """A thread noting when each of the given processes exits (polled every ``interval`` s;
    a zombie counts as exited)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.pids = dict(pids)
        self.exited: dict[str, float] = {}  # name -> time.monotonic() it was seen gone
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="restart-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.exited) < len(self.pids):
            for name, pid in self.pids.items():
                if name not in self.exited and not _running(pid):
                    self.exited[name] = time.monotonic()
            self._stop.wait(self.interval)

    def __enter__(self) -> RestartWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X", "")


@dataclass(frozen=True)
class Window:
    """The part of a load's time line that belongs to one host's restart."""

    host: str
    exited: float  # when its old agent exited
    start: float  # midway from the previous restart (or -inf)
    end: float  # midway to the next restart (or +inf)
    writes_ok: int
    writes_failed: int
    longest: Gap | None  # the longest write gap overlapping the window


def windows(load: WriteLoad, exited: dict[str, float]) -> list[Window]:
    """Split the load's time line between the restarts in ``exited`` (host -> time its agent
    exited), each window from midway after the previous restart to midway before the next;
    for each, the writes started in it and the longest gap between acknowledgements that
    overlaps it (a gap spanning two windows is counted in both)."""
    order = sorted(exited.items(), key=lambda kv: kv[1])
    gaps = load.gaps()
    out = []
    for k, (host, t) in enumerate(order):
        start = (order[k - 1][1] + t) / 2 if k else float("-inf")
        end = (t + order[k + 1][1]) / 2 if k + 1 < len(order) else float("inf")
        inside = [w for w in load.writes if start <= w.started < end]
        overlapping = [g for g in gaps if g.end > start and g.start < end]
        out.append(Window(host, t, start, end, sum(w.ok for w in inside),
                          sum(not w.ok for w in inside),
                          max(overlapping, key=lambda g: g.length, default=None)))
    return out
