"""Task health checks on this node: probing, and the health state of each running task.

Owns: resolving a task's check (its spec's ``task.container.healthcheck`` over the image's
HEALTHCHECK, Docker's rules), running the probes of every task with a check that runs on
this node, and each task's health — ``starting`` → ``healthy`` / ``unhealthy`` — with its last
results (``HealthMonitor``). The decision is a pure function, ``advance(state, check,
result)``; the Worker (node/worker.py) puts the health into the task's status, stops an
unhealthy task (and reports it FAILED), and the mesh keeps every task that is not healthy out
of the balancer and DNS. Must not touch: the store, the runtime's records; it only reads
/proc of the task's init and joins the task's cgroup from a child process.

Probes, all run by the agent (nothing needed in the image but what the check itself runs):

* ``exec`` (``--health-cmd CMD`` = ``/bin/sh -c CMD``, or the image's ``CMD``/``CMD-SHELL``):
  as ``docker exec`` does — a small host shell writes its pid into every cgroup of the task
  (so the task's limits bound the check), then execs ``nsenter`` into the init's mount, uts,
  ipc, net and pid namespaces with its root and working directory, which execs
  ``shoal-execdrop`` (runtime/execdrop.c, from an inherited fd) to take the init's uid, gids
  and capability set before the check runs, with the task's environment (from
  /proc/PID/environ). Bounded by the timeout (its session is killed),
  output kept (first ``output_limit`` bytes).
* ``http`` / ``tcp``: a socket made inside the task's network namespace (``setns`` there and
  back on the event loop's thread: a socket stays in the namespace it was made in), then
  used from the event loop — no process, no thread hop per probe.

Errors: none escape: a probe that cannot run is a failed result (exit code -1) with the reason
as its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from shoal.raft.models import Health, HealthResult
from shoal.raft.spec import HealthCheck, parse_http_check
from shoal.runtime.cgroups import CgroupLayout, detect
from shoal.runtime.errors import ConfigError
from shoal.runtime.images import ImageHealthcheck
from shoal.runtime.launcher import ensure_execdrop

log = logging.getLogger("shoal.health")

CLONE_NEWNET = 0x40000000
DEFAULT_INTERVAL = 30.0  # Docker's defaults, for what neither the spec nor the image sets
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
# the host shell that joins the task's cgroups, then execs nsenter: sh -c SCRIPT sh N PROCS...
_JOIN = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 126; shift; '
         'n=$((n-1)); done; exec "$@"')
# The environment of the host stages (the shell, nsenter): never the task's — a variable
# such as LD_PRELOAD would run the task's code as the host's root. The command's own reaches
# shoal-execdrop through a memfd (--env-fd), which sets it once inside the task.
HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def sealed_helper(path: Path) -> int:
    """A sealed in-memory copy of the compiled shoal-execdrop (a memfd that can no longer be
    written, shrunk or grown): what nsenter executes as /proc/self/fd/N. A task that gets hold
    of that fd cannot change the helper the next probes run as the host's root (runc's fix of
    CVE-2019-5736); the file on disk is never handed out."""
    data = path.read_bytes()
    fd = os.memfd_create("shoal-execdrop", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


class ExecHelper:
    """The node's one sealed copy of shoal-execdrop (``sealed_helper``), shared by the exec
    health checks and ``shoal exec``: compiled and cached in ``helper_dir`` with the C compiler
    ``cc`` on first use (in a thread; callers that come meanwhile wait for that one build).
    ``helper_dir`` None: a private temporary directory, removed once the copy is sealed.
    ``seccomp_of``: the seccomp filter of the task whose init is a pid (the runtime's
    ``exec_filter``), which a command run in it takes; None: no filter."""

    def __init__(self, helper_dir: Path | None, cc: str = "cc",
                 seccomp_of: Callable[[int], bytes | None] | None = None) -> None:
        self.helper_dir = helper_dir
        self.cc = cc
        self.seccomp_of = seccomp_of or (lambda _pid: None)
        self._fd: int | None = None
        self._lock = asyncio.Lock()

    async def fd(self) -> int:
        """The sealed memfd (pass it with pass_fds; never close it)."""
        async with self._lock:
            if self._fd is None:
                where = self.helper_dir or Path(tempfile.mkdtemp(prefix="shoal-execdrop-"))
                try:
                    path = await asyncio.to_thread(ensure_execdrop, where, self.cc)
                    self._fd = sealed_helper(path)
                finally:
                    if self.helper_dir is None:  # the memfd keeps it: leave nothing behind
                        shutil.rmtree(where, ignore_errors=True)
            return self._fd


def env_fd(env: dict[str, str]) -> int:
    """The command's environment for shoal-execdrop's --env-fd: a memfd of NUL-separated
    KEY=VALUE entries (close-on-exec; pass it with pass_fds, close it after the spawn)."""
    return _memfd("shoal-exec-env", b"".join(f"{k}={v}".encode(errors="surrogateescape")
                                              + b"\0" for k, v in env.items()))


def filter_fd(program: bytes) -> int:
    """A task's seccomp filter for shoal-execdrop's --seccomp-fd (a memfd, close-on-exec;
    pass it with pass_fds, close it after the spawn)."""
    return _memfd("shoal-exec-seccomp", program)


def _memfd(name: str, blob: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def enter_argv(nsenter: str, layout: CgroupLayout, pid: int, helper_fd: int, envfd: int,
               cmd: list[str], options: Sequence[str] = (), wd: bool = True,
               caps: str | None = None, seccomp_fd: int | None = None) -> list[str]:
    """The host command line that runs ``cmd`` in the task whose init is ``pid``: a host shell
    joins the task's cgroups, nsenter enters its namespaces and root (its working directory
    too, ``wd``), shoal-execdrop (the fd ``helper_fd``) takes the init's credentials — or
    ``options``' (--user, --workdir, --console, --detach) — and the environment in ``envfd``.
    ``caps``: the capability set to keep (hex, as CapBnd) instead of the init's;
    ``seccomp_fd``: the task's seccomp filter (``filter_fd``), which the command takes."""
    procs = cgroup_procs(pid, layout)
    uid, gid, groups, init_caps = _credentials(pid)
    caps = caps or init_caps
    return ["/bin/sh", "-c", _JOIN, "sh", str(len(procs)), *procs,
            nsenter, "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-r", *(["-w"] if wd else []),
            "--", f"/proc/self/fd/{helper_fd}", "--env-fd", str(envfd),
            *(["--seccomp-fd", str(seccomp_fd)] if seccomp_fd is not None else []), *options,
            str(uid), str(gid), groups, caps, *cmd]


@dataclass
class HealthConfig:
    """How this node probes its tasks."""

    # Results kept per task (Docker keeps 5); the newest are in the task's status.
    log_size: int = 5
    # Bytes of a probe's output kept per result. More = fuller `service inspect`, bigger
    # status reports in the Raft log.
    output_limit: int = 4096
    # Seconds between probes during a check's start period (Docker's --health-start-interval):
    # failures there do not count, so a task can become healthy sooner than one interval.
    start_interval: float = 1.0
    # Seconds after which the health log of a task whose health did not change is written to
    # the replicated status again (a change of health or of the failing streak is written at
    # once). Lower = fresher `service ps` output, more Raft writes (one per task per period).
    # 0 = write every probe.
    log_refresh: float = 30.0
    # Probe times are rounded up to a multiple of this, seconds: probes due about together
    # share one wake-up of the agent's loop (a wake-up costs more CPU than a TCP probe here).
    # Delays a probe by at most this much. 0 = exact times.
    tick: float = 0.1
    # The nsenter binary for exec checks (util-linux); resolved on PATH.
    nsenter: str = "nsenter"
    # Where the exec checks' helper (runtime/execdrop.c: takes the task's uid, gids and
    # capabilities before running the check) is compiled and cached, with the C compiler
    # ``cc``. None = a private temporary directory, removed once the helper is open (built
    # again by each process).
    helper_dir: Path | None = None
    cc: str = "cc"

    def validate(self) -> None:
        if self.log_size < 1 or self.output_limit < 0:
            raise ValueError("log_size must be >= 1 and output_limit >= 0")
        if self.start_interval <= 0 or self.log_refresh < 0 or self.tick < 0:
            raise ValueError("start_interval must be > 0, log_refresh and tick >= 0")


@dataclass(frozen=True)
class Check:
    """A resolved check: what to probe and when (every field set)."""

    kind: str  # "exec" | "http" | "tcp"
    argv: tuple[str, ...] = ()  # exec: the program and arguments inside the task
    host: str = "127.0.0.1"  # http/tcp: address inside the task's network namespace
    port: int = 0
    path: str = "/"
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    start_period: float = 0.0

    def describe(self) -> str:
        if self.kind == "exec":
            return " ".join(self.argv)
        return f"{self.kind} {self.host}:{self.port}{self.path if self.kind == 'http' else ''}"


def resolve(spec: HealthCheck, image: ImageHealthcheck | None = None,
            shell: tuple[str, ...] = ()) -> Check | None:
    """The check a task runs, or None (no check, or ``--no-healthcheck``, or the image says
    NONE). The spec's test wins; a zero interval/timeout/retries/start period takes the
    image's value, then Docker's default (as Docker merges a service's and an image's
    HEALTHCHECK)."""
    if spec.disable:
        return None
    img = image or ImageHealthcheck()
    argv: tuple[str, ...] = ()
    kind, host, port, path = "", "127.0.0.1", 0, "/"
    if spec.command:
        kind, argv = "exec", ("/bin/sh", "-c", spec.command)
    elif spec.exec:  # (Docker's ["CMD", ...]: no shell, as an image's own CMD form)
        kind, argv = "exec", tuple(spec.exec)
    elif spec.http:
        kind = "http"
        host, port, path = parse_http_check(spec.http)
    elif spec.tcp:
        kind, port = "tcp", spec.tcp
    elif img.test and img.test[0] == "CMD-SHELL" and len(img.test) > 1:
        kind, argv = "exec", (*(shell or ("/bin/sh", "-c")), img.test[1])  # (its SHELL)
    elif img.test and img.test[0] == "CMD" and len(img.test) > 1:
        kind, argv = "exec", tuple(img.test[1:])
    if not kind:
        return None  # nothing given, the image has none (or "NONE")
    return Check(kind=kind, argv=argv, host=host, port=port, path=path,
                 interval=spec.interval or img.interval or DEFAULT_INTERVAL,
                 timeout=spec.timeout or img.timeout or DEFAULT_TIMEOUT,
                 retries=spec.retries or img.retries or DEFAULT_RETRIES,
                 start_period=spec.start_period or img.start_period)


# ---------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class HealthState:
    """A task's health as this node's monitor sees it."""

    health: Health = Health.STARTING
    failing_streak: int = 0
    log: tuple[HealthResult, ...] = ()


def advance(state: HealthState, check: Check, result: HealthResult, started_at: float,
            log_size: int = 5) -> HealthState:
    """The health after one more probe result (Docker's rules). One success: healthy and the
    streak cleared. A failure while still starting and within ``start_period`` of
    ``started_at`` does not count; otherwise it extends the streak, and ``retries``
    consecutive ones make the task unhealthy — for good (the Worker then stops it)."""
    entries = (*state.log, result)[-log_size:]
    if state.health is Health.UNHEALTHY:
        return replace(state, log=entries)
    if result.exit_code == 0:
        return HealthState(Health.HEALTHY, 0, entries)
    if state.health is Health.STARTING and result.start < started_at + check.start_period:
        return replace(state, log=entries)
    streak = state.failing_streak + 1
    health = Health.UNHEALTHY if streak >= check.retries else state.health
    return HealthState(health, streak, entries)


def next_delay(state: HealthState, check: Check, started_at: float, now: float,
               start_interval: float) -> float:
    """Seconds until the next probe: ``start_interval`` while starting within the start
    period (those failures do not count), else ``interval``."""
    if state.health is Health.STARTING and now < started_at + check.start_period:
        return min(check.interval, start_interval)
    return check.interval


# ---------------------------------------------------------------------------- probes
Prober = Callable[[Check, int], Awaitable[HealthResult]]

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_own_netns: int | None = None  # an fd of the agent's own network namespace (opened once)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}")


def socket_in_netns(pid: int) -> socket.socket:
    """A non-blocking TCP socket in the network namespace of ``pid``: the calling thread
    enters the namespace, makes the socket (a socket stays in the namespace it was made in)
    and comes back, with nothing else running on it in between (~20 us).

    Why on the calling thread (the event loop's) and not a probe thread: the thread hop cost
    ~160 us of CPU per probe (GIL handoff and a loop wake-up), a third of an HTTP probe
    (docs/benchmarks.md, "Health probes"). setns(2) moves only the calling thread; returning
    to the agent's own namespace cannot fail where entering the task's succeeded (same
    privilege, an fd held open), and if it ever did the agent must not go on in a task's
    namespace: it exits (an agent restart adopts the running tasks)."""
    global _own_netns
    if _own_netns is None:
        _own_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                _setns(_own_netns)
            except OSError:  # pragma: no cover (see above)
                log.critical("cannot return to the agent's network namespace: exiting")
                os._exit(70)
    finally:
        os.close(target)
    sock.setblocking(False)
    return sock


def cgroup_procs(pid: int, layout: CgroupLayout) -> list[str]:
    """Every cgroup.procs file of the cgroups ``pid`` is in (v1 hierarchies and the
    unified one), from /proc/PID/cgroup."""
    out: list[str] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if not ctrls:
            mount = layout.unified
        else:
            mount = next((layout.v1[c] for c in ctrls.split(",") if c in layout.v1), None)
        if mount is not None:
            procs = str(mount / path.lstrip("/") / "cgroup.procs")
            if procs not in out:
                out.append(procs)
    return out


def _credentials(pid: int) -> tuple[int, int, str, str]:
    """uid, gid, supplementary gids ("1,2") and capability bounding set (hex) of ``pid``."""
    uid = gid = 0
    groups, caps = "", "0"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uid = int(value.split()[0])
        elif key == "Gid":
            gid = int(value.split()[0])
        elif key == "Groups":
            groups = ",".join(value.split())
        elif key == "CapBnd":
            caps = value.strip()
    return uid, gid, groups, caps


def _environ(pid: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


class Probes:
    """The real probes (exec through nsenter, HTTP/TCP from inside the netns)."""

    def __init__(self, config: HealthConfig, helper: ExecHelper | None = None) -> None:
        self.config = config
        self.nsenter = shutil.which(config.nsenter) or config.nsenter
        self._layout: CgroupLayout | None = None
        self.helper = helper or ExecHelper(config.helper_dir, config.cc)

    async def __call__(self, check: Check, pid: int) -> HealthResult:
        start = time.time()
        try:
            async with asyncio.timeout(check.timeout):
                if check.kind == "exec":
                    code, out = await self._exec(check, pid)
                else:
                    code, out = await self._net(check, pid)
        except TimeoutError:
            code, out = -1, f"health check exceeded its timeout ({check.timeout:g}s)"
        except (OSError, ConfigError) as exc:  # (ConfigError: no C compiler for the helper)
            code, out = -1, f"health check could not run: {exc}"
        return HealthResult(start=start, end=time.time(), exit_code=code,
                            output=out[:self.config.output_limit])

    def exec_argv(self, check: Check, pid: int, helper_fd: int, envfd: int,
                  seccomp_fd: int | None = None) -> list[str]:
        """The host command line of one exec probe (``enter_argv``), the task's environment
        in ``envfd``, its seccomp filter in ``seccomp_fd``."""
        if self._layout is None:
            self._layout = detect()
        return enter_argv(self.nsenter, self._layout, pid, helper_fd, envfd, list(check.argv),
                          seccomp_fd=seccomp_fd)

    async def _exec(self, check: Check, pid: int) -> tuple[int, str]:
        fd = await self.helper.fd()
        program = self.helper.seccomp_of(pid)
        fds = [env_fd(_environ(pid)), *([filter_fd(program)] if program is not None else [])]
        try:
            argv = self.exec_argv(check, pid, fd, *fds)
            proc = await asyncio.create_subprocess_exec(
                *argv, env=HOST_ENV, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, pass_fds=(fd, *fds))
        finally:
            for extra in fds:
                os.close(extra)
        try:
            assert proc.stdout is not None
            out = b""
            while chunk := await proc.stdout.read(65536):  # to EOF; keep the first bytes
                out += chunk[:max(self.config.output_limit - len(out), 0)]
            code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session: nsenter and the check
            with contextlib.suppress(BaseException):
                await asyncio.shield(proc.wait())
            raise
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the check left behind
        return code, out.decode(errors="replace")

    async def _net(self, check: Check, pid: int) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        sock = socket_in_netns(pid)
        try:
            # (loopback and bridge connects mostly complete at once: the loop's sock_connect
            # is used only when they do not — it costs ~150 us of CPU more per probe)
            err = sock.connect_ex((check.host, check.port))
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                try:
                    await loop.sock_connect(sock, (check.host, check.port))
                    err = 0
                except OSError as exc:
                    err = exc.errno or errno.ECONNREFUSED
            if err:
                return 1, f"connect {check.host}:{check.port}: {os.strerror(err)}"
            if check.kind == "tcp":
                return 0, f"connected to {check.host}:{check.port}"
            request = (f"GET {check.path} HTTP/1.0\r\nHost: {check.host}:{check.port}\r\n"
                       "User-Agent: shoal-health\r\nConnection: close\r\n\r\n").encode()
            await loop.sock_sendall(sock, request)
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                data += chunk
            line = data.split(b"\r\n", 1)[0].decode(errors="replace")
            parts = line.split()
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                return 1, f"GET {check.path}: not an HTTP answer: {line[:200]!r}"
            status = int(parts[1])
            return (0 if 200 <= status < 400 else 1), f"GET {check.path}: {line}"
        finally:
            sock.close()


# ---------------------------------------------------------------------------- the monitor
@dataclass
class _Probe:
    check: Check
    pid: int
    started_at: float
    state: HealthState
    published: HealthState  # what the Worker reports (see HealthConfig.log_refresh)
    published_at: float
    runner: asyncio.Task[None] | None = None


class HealthMonitor:
    """Probes every task with a check on this node; one coroutine per task. ``on_change``
    is called (on the event loop) when a task's published health changes."""

    def __init__(self, config: HealthConfig | None = None, prober: Prober | None = None,
                 on_change: Callable[[str], None] | None = None,
                 helper: ExecHelper | None = None) -> None:
        self.config = config or HealthConfig()
        self.config.validate()
        self.prober: Prober = prober or Probes(self.config, helper)
        self.on_change = on_change
        self._tasks: dict[str, _Probe] = {}

    def watch(self, task_id: str, check: Check, pid: int, started_at: float,
              initial: Health = Health.STARTING) -> None:
        """Start probing ``task_id`` (its init is ``pid``), unless it is already watched.
        ``initial``: the health it had (an agent restart adopts a healthy task as healthy)."""
        if task_id in self._tasks:
            return
        state = HealthState(health=initial if initial is not Health.NONE else Health.STARTING)
        p = _Probe(check, pid, started_at, state, state, time.monotonic())
        self._tasks[task_id] = p
        p.runner = asyncio.create_task(self._run(task_id, p), name=f"health-{task_id}")

    def watching(self, task_id: str) -> bool:
        return task_id in self._tasks

    def status(self, task_id: str) -> HealthState | None:
        """The published health of ``task_id`` (None: not watched)."""
        p = self._tasks.get(task_id)
        return p.published if p is not None else None

    def stop(self, task_id: str) -> None:
        """Stop probing ``task_id`` (it ended) but keep its last health (the Worker reports
        an unhealthy task that it stopped as FAILED)."""
        p = self._tasks.get(task_id)
        if p is not None and p.runner is not None:
            p.runner.cancel()
            p.runner = None

    def forget(self, task_id: str) -> None:
        p = self._tasks.pop(task_id, None)
        if p is not None and p.runner is not None:
            p.runner.cancel()

    def close(self) -> None:
        for tid in list(self._tasks):
            self.forget(tid)

    async def _run(self, task_id: str, p: _Probe) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            while p.state.health is not Health.UNHEALTHY:
                # the next probe: one delay after the previous one was due (not after it
                # ended), on a tick
                now = loop.time()
                due = max(due + next_delay(p.state, p.check, p.started_at, time.time(),
                                           cfg.start_interval), now)
                if cfg.tick:
                    due = math.ceil(due / cfg.tick - 1e-6) * cfg.tick
                await asyncio.sleep(due - now)
                result = await self.prober(p.check, p.pid)
                p.state = advance(p.state, p.check, result, p.started_at, cfg.log_size)
                if result.exit_code != 0:
                    log.info("task %s: health check failed (%d/%d): %s", task_id,
                             p.state.failing_streak, p.check.retries, result.output[:200])
                self._publish(task_id, p)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s: health monitor failed", task_id)

    def _publish(self, task_id: str, p: _Probe) -> None:
        now = time.monotonic()
        old, new = p.published, p.state
        changed = (new.health, new.failing_streak) != (old.health, old.failing_streak)
        if changed or now - p.published_at >= self.config.log_refresh:
            p.published, p.published_at = new, now
            if changed and new.health is not old.health:
                log.info("task %s is %s", task_id, new.health.value)
            if self.on_change is not None:
                self.on_change(task_id)
