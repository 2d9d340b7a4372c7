"""Idle cost of shoal and of Docker Swarm 20.10, side by side: CPU % of a core and RSS per node.

    .venv/bin/python bench/swarm_idle.py [--window 60] [--settle 15] [--only both|shoal|swarm]

What it measures: two clusters of 3 managers + 2 workers each, doing nothing, on netns hosts
of one tests/netlab.py lab on this machine, over the SAME window: per node, the CPU time
(utime+stime from /proc/PID/stat, all threads) its processes used during the window as % of
one core, and the sum of their RSS (statm) at the end of the window.

* shoal (the first 5 hosts): one ``shoal agent`` per host (``Lab.form_cluster``, the
  agents' default LAN settings). A node's processes are the agent, its descendants (its
  load-balancer worker, ``python -m shoal.lb``) and anything else in the host's network
  namespace; bench/idle_cost.py counts the agent process alone.
* Docker Swarm (the last 5 hosts): Debian's ``docker.io`` 20.10: one ``dockerd`` per host,
  started in the host's network namespace (``nsenter --net``, own UTS namespace for a
  distinct hostname) with its own --data-root, --exec-root, --pidfile, -H unix socket,
  --config-file (its own, so /etc/docker/daemon.json is never read; it only sets
  "deprecated-key-path", the libtrust key that would otherwise be written to
  /etc/docker/key.json) and ``--storage-driver vfs``, all under the host's lab data dir.
  Each dockerd starts its own ``containerd`` child. ``docker swarm init`` on the first,
  ``swarm join`` of two managers and two workers; the script waits for ``docker node ls`` to
  show 5 Ready. Like any default Swarm, every node then has the ``ingress`` overlay network
  (a sandbox netns, a VXLAN, and libnetwork's networkdb gossip among the nodes).
  A node's processes are the dockerd, its descendants (containerd; no shims: no services
  run) and anything else in the host's network namespace.

For every process: CPU = (utime+stime+cutime+cstime at the end) - (the same at the start),
the c* terms covering children reaped during the window; a process that appears during the
window counts from zero, one that disappears before its end is lost unless its parent reaped
it (the count of such process changes is printed: 0 expected). The clock tick is 10 ms, so a
figure is ±(0.01 s / window) per process (±0.017 % of a core over 60 s).

The leader is found with ``docker node ls`` (MANAGER STATUS "Leader") and shoal's ``node ls``
(manager_status "leader"); medians are per role: leader, the other managers, workers.

Nothing is pinned: every process may run on any core (its Cpus_allowed_list is printed) and
the kernel moves them; the script prints the cores their threads last ran on, for the record
only. The script itself only sleeps during the window; the load average and how busy the
whole machine was (/proc/stat) are printed for the window, so a noisy neighbour shows.

Install: if /usr/sbin/dockerd is missing, the script runs
``apt-get install -y --no-install-recommends docker.io`` (Debian 12: docker.io 20.10.24,
containerd 1.6, runc); --no-install-recommends keeps out cgroupfs-mount, which would mount
cgroup hierarchies. The package's init scripts would start a system dockerd/containerd where
/usr/sbin/policy-rc.d allows it: this script stops no such daemon, and refuses to run while a
system containerd socket (/run/containerd/containerd.sock) exists, since dockerd would then
use it instead of starting its own. The docker CLI is /usr/bin/docker (the package's, same
version), never whatever ``docker`` comes first on PATH.

Cleanup, also on failure, Ctrl-C and SIGTERM: every dockerd is sent SIGTERM by PID at once,
then each is waited for (SIGKILL after 20 s) and its containerd too (SIGTERM, then SIGKILL, by
PID, if it outlives dockerd); what dockerd left mounted under its dirs (its data-root bind,
the ingress sandbox netns binds) is unmounted (``umount -l``); cgroups named docker* that
appeared during the run are removed if empty (none did in the runs here: no container ran);
then the lab is closed (agents, netns, veths, data dirs). Two empty directories are created
at fixed global paths whatever the flags say: /run/docker/plugins (dockerd) and
/opt/containerd/{bin,lib} (containerd's "opt" plugin); they are removed when they did not exist
before the run and still hold no file. Then it checks and prints: no dockerd/containerd left
on the machine, no lab netns, no mount under the lab dir, and the global things dockerd is
known to touch unchanged (the GLOBAL_PATHS below; sysctls kernel.keys.root_maxkeys and
root_maxbytes, which dockerd raises when below 1,000,000 — here they already are).

dockerd runs in the host's netns but sees the root namespace's /sys (nsenter --net does not
remount it, as tests/netlab.py wants for shoal's cgroups): its few writes under
/sys/class/net for the ingress bridge fail with "permission denied" (logged once at start).
The netns has no IPVS sysctls either (no IPVS in this kernel), logged once too.

Limits: both clusters share the machine's 2 cores and one kernel (one ARP table, one
conntrack), so their idle costs add to each other's scheduling noise; RSS counts shared pages
(libc, and for shoal the Python interpreter's file pages shared by the 5 agents) in every
process; the Swarm has no ingress routing mesh here (no IPVS in this kernel), so its ingress
network is allocated but its load balancer is not set up; Swarm's vfs storage driver does not
matter at idle (no image, no container).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import multiplier_args
from labstate import CommandError, LabError

from netlab import REPO, Host, Lab, list_netns, wait_until

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # the package's client (another one may come first on PATH)
SYSTEM_CONTAINERD = Path("/run/containerd/containerd.sock")
MANAGERS, WORKERS = 3, 2
STOP_TIMEOUT = 20.0  # s between SIGTERM and SIGKILL for a dockerd (and then its containerd)
# Global paths dockerd/containerd use by default: this run must not create any of them.
GLOBAL_PATHS = ("/var/lib/docker", "/run/docker", "/etc/docker/key.json",
                "/etc/docker/daemon.json", "/run/containerd", "/var/lib/containerd",
                "/opt/containerd", "/run/docker.sock", "/root/.docker")
# Global sysctls dockerd is known to write (daemon/keys.go raises both when low).
GLOBAL_SYSCTLS = ("/proc/sys/kernel/keys/root_maxkeys", "/proc/sys/kernel/keys/root_maxbytes")
CGROUP_GLOBS = ("/sys/fs/cgroup/*/docker*", "/sys/fs/cgroup/unified/docker*",
                "/sys/fs/cgroup/docker*")


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def machine() -> str:
    """Load average and available memory now."""
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
    return f"[load {la}; {avail / 1024:.1f} GiB available]"


def busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (busy = all but idle and iowait)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - vals[3] - vals[4], total


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Proc:
    """One process at one instant (from /proc/PID/stat, statm, status)."""

    pid: int
    start: int  # start time in ticks since boot: (pid, start) names a process safely
    ppid: int
    comm: str  # the command name, "python -m MODULE" for a Python module (shoal's LB worker)
    cpu: float  # s: utime + stime + cutime + cstime
    rss: int  # bytes
    threads: int
    allowed: str  # Cpus_allowed_list
    netns: str  # readlink /proc/PID/ns/net

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        netns = os.readlink(f"/proc/{pid}/ns/net")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    if comm.startswith("python") and "-m" in argv[:-1]:
        comm = f"python -m {argv[argv.index('-m') + 1]}"
    f = stat.rsplit(")", 1)[1].split()  # f[0] is field 3 (state): field N is f[N - 3]
    allowed = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                    if line.startswith("Cpus_allowed_list:")), "?")
    return Proc(pid=pid, start=int(f[19]), ppid=int(f[1]), comm=comm,
                cpu=sum(int(x) for x in f[11:15]) / TICK,
                rss=int(statm.split()[1]) * PAGE, threads=int(f[17]), allowed=allowed,
                netns=netns)


def all_procs() -> dict[int, Proc]:
    out: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            p = read_proc(int(entry.name))
            if p is not None:
                out[p.pid] = p
    return out


def thread_cpus(pid: int) -> set[int]:
    """The cores the threads of ``pid`` last ran on (stat field 39)."""
    cpus: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                cpus.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[36]))
    return cpus


def netns_id(host: Host) -> str:
    """What readlink /proc/PID/ns/net gives for a process in ``host``'s netns."""
    return f"net:[{os.stat(f'/var/run/netns/{host.netns}').st_ino}]"


def node_procs(procs: dict[int, Proc], root: int, netns: str) -> list[Proc]:
    """``root``, its descendants, and every other process in the network namespace ``netns``."""
    mine = {root} if root in procs else set()
    mine |= {p.pid for p in procs.values() if p.netns == netns}
    grew = True
    while grew:
        grew = False
        for p in procs.values():
            if p.pid not in mine and p.ppid in mine:
                mine.add(p.pid)
                grew = True
    return sorted((procs[pid] for pid in mine), key=lambda p: p.pid)


# ---------------------------------------------------------------------------------------------
# Nodes of both systems


@dataclass
class Node:
    system: str  # "shoal" | "swarm"
    host: Host
    root: int  # the agent's / dockerd's pid
    role: str = "?"  # leader | manager | worker
    before: list[Proc] = field(default_factory=list)
    after: list[Proc] = field(default_factory=list)

    def sample(self, procs: dict[int, Proc]) -> list[Proc]:
        return node_procs(procs, self.root, netns_id(self.host))

    def cpu_by_comm(self) -> dict[str, float]:
        """CPU seconds used in the window, per command name."""
        start = {p.key: p.cpu for p in self.before}
        out: dict[str, float] = {}
        for p in self.after:
            out[p.comm] = out.get(p.comm, 0.0) + p.cpu - start.get(p.key, 0.0)
        return out

    def churn(self) -> int:
        """Processes that appeared or disappeared during the window."""
        return len({p.key for p in self.before} ^ {p.key for p in self.after})

    def rss_mib(self) -> float:
        return sum(p.rss for p in self.after) / (1 << 20)


class Dockerd:
    """One dockerd (and the containerd it starts) in one lab host, all its state in
    DATA_DIR/dk. Stopped by PID only; see stop()."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.dir = host.data_dir / "dk"  # short: unix socket paths live under it
        self.sock = self.dir / "docker.sock"
        self.log = host.data_dir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.containerd: list[tuple[int, int]] = []  # (pid, start) of its containerd

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.dir.mkdir()
        # the trust key's path is a config-file key in 20.10 (no flag): outside /etc/docker
        config = self.dir / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.dir / "key.json")}) + "\n")
        self.proc = self.host.spawn(
            DOCKERD, "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "run"),
            "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.sock}",
            "--config-file", str(config), "--storage-driver", "vfs",
            log_name="dockerd", hostname=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``docker version`` answers; LabError at once if dockerd exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise LabError(f"{self.host.name}: dockerd exited "
                               f"({self.proc.returncode if self.proc else None})\n"
                               f"{self.log_tail()}")
            if self.docker("version", "--format", "{{.Server.Version}}",
                           check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"{self.host.name}: dockerd not answering on {self.sock} after "
                               f"{timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.3)
        self.containerd = [(p.pid, p.start) for p in all_procs().values()
                           if p.ppid == self.pid and p.comm.startswith("containerd")]

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0
               ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this dockerd (run inside the host)."""
        return self.host.run(DOCKER, "-H", f"unix://{self.sock}", *args, check=check,
                             timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(no dockerd log: {exc})"
        return f"--- {self.log} (last {len(text)} lines) ---\n" + "\n".join(text)

    def terminate(self) -> None:
        """Send SIGTERM to dockerd (by pid); stop() waits for it."""
        if self.proc is None:
            return
        if not self.containerd:  # (failed before wait_ready recorded it)
            self.containerd = [(p.pid, p.start) for p in all_procs().values()
                               if p.ppid == self.pid and p.comm.startswith("containerd")]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> list[str]:
        """terminate(), then wait: SIGKILL after STOP_TIMEOUT; then the same for its
        containerd if it outlived dockerd (it is our child then: the lab made us subreaper).
        Returns problems."""
        problems: list[str] = []
        if self.proc is None:
            return problems
        self.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            problems.append(f"{self.host.name}: dockerd {self.pid} ignored SIGTERM for "
                            f"{STOP_TIMEOUT:.0f} s: SIGKILL")
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid, start in self.containerd:
            if not _same_process(pid, start):
                continue
            deadline = time.monotonic() + STOP_TIMEOUT
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # (dockerd normally stops it itself)
            while _same_process(pid, start) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if _same_process(pid, start):
                problems.append(f"{self.host.name}: containerd {pid} outlived dockerd by "
                                f"{STOP_TIMEOUT:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            _reap(pid)
        return problems


def _same_process(pid: int, start: int) -> bool:
    """``pid`` still names the process that started at ``start`` and is not a zombie."""
    p = read_proc(pid)
    if p is None or p.start != start:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _mountpoints() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt))
    return points


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")


def unmount_under(roots: list[Path]) -> tuple[list[str], list[str]]:
    """``umount -l`` every mount point under ``roots``, deepest first: (done, problems)."""
    done: list[str] = []
    problems: list[str] = []
    for mnt in sorted((m for m in _mountpoints() if any(_under(m, r) for r in roots)),
                      key=len, reverse=True):
        res = subprocess.run(["umount", "-l", mnt], capture_output=True, text=True)
        (done if res.returncode == 0 else problems).append(
            mnt if res.returncode == 0 else f"umount {mnt}: {res.stderr.strip()}")
    return done, problems


def docker_cgroups() -> set[Path]:
    found: set[Path] = set()
    for pattern in CGROUP_GLOBS:
        found |= {p for p in Path("/").glob(pattern.lstrip("/")) if p.is_dir()}
    return found


def remove_new_cgroups(before: set[Path]) -> tuple[list[str], list[str]]:
    """rmdir the docker* cgroups (and their sub-groups) that were not there before the run,
    only where no process is in them: (removed, problems)."""
    removed: list[str] = []
    problems: list[str] = []
    for top in sorted(docker_cgroups() - before):
        for d in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            procs = (d / "cgroup.procs").read_text().split() if (d / "cgroup.procs").exists() \
                else []
            if procs:
                problems.append(f"cgroup {d} still has processes {' '.join(procs)}: kept")
                continue
            try:
                d.rmdir()
                removed.append(str(d))
            except OSError as exc:
                problems.append(f"rmdir {d}: {exc}")
    return removed, problems


def global_state() -> dict[str, str]:
    """What this run must leave as it found it: existence of GLOBAL_PATHS, GLOBAL_SYSCTLS."""
    out = {p: ("exists" if os.path.lexists(p) else "absent") for p in GLOBAL_PATHS}
    for p in GLOBAL_SYSCTLS:
        try:
            out[p] = Path(p).read_text().strip()
        except OSError as exc:
            out[p] = f"unreadable ({exc.strerror})"
    return out


def remove_new_global_dirs(before: dict[str, str]) -> list[str]:
    """Remove those of GLOBAL_PATHS that did not exist before the run and are directory trees
    without a single file (dockerd makes /run/docker/plugins, containerd /opt/containerd/{bin,
    lib}, whatever --exec-root/--data-root say). Anything holding a file is left (and then
    reported by the check)."""
    removed = []
    for path in GLOBAL_PATHS:
        top = Path(path)
        if before.get(path) != "absent" or top.is_symlink() or not top.is_dir():
            continue
        tree = [top, *top.rglob("*")]
        if any(not p.is_dir() or p.is_symlink() for p in tree):
            continue
        for d in sorted(tree, key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------
# Forming the clusters


def ensure_docker() -> None:
    if not Path(DOCKERD).exists() or not Path(DOCKER).exists():
        say("dockerd missing: apt-get install -y --no-install-recommends docker.io")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "docker.io"],
                       check=True, env=env)
    if SYSTEM_CONTAINERD.exists():
        raise LabError(f"{SYSTEM_CONTAINERD} exists (a system containerd?): every dockerd "
                       "would use it instead of starting its own; stop it or run elsewhere")


def versions() -> str:
    dockerd = subprocess.run([DOCKERD, "--version"], capture_output=True, text=True).stdout \
        if Path(DOCKERD).exists() else "not installed"
    shoal = subprocess.run([str(REPO / ".venv" / "bin" / "shoal"), "--version"],
                           capture_output=True, text=True).stdout
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout
    return (f"{shoal.strip()} (git {rev.strip() or '?'}); dockerd: {dockerd.strip()}")


def form_shoal(lab: Lab, hosts: list[Host]) -> list[Node]:
    t0 = time.monotonic()
    assert hosts == lab.hosts[:len(hosts)]  # form_cluster uses the first hosts
    lab.form_cluster(managers=MANAGERS, workers=WORKERS, timeout=120)
    say(f"shoal: {MANAGERS} managers + {WORKERS} workers ready on "
        f"{hosts[0].name}..{hosts[-1].name} in {time.monotonic() - t0:.1f} s")
    out = []
    for h in hosts:
        assert h.agent_pid is not None
        out.append(Node("shoal", h, h.agent_pid))
    return out


def shoal_roles(nodes: list[Node]) -> None:
    listed = nodes[0].host.cli_json("node", "ls")
    role = {x["addr"]: ("leader" if x["manager_status"] == "leader" else x["role"])
            for x in listed}
    for n in nodes:
        n.role = role.get(n.host.ip, "?")


def form_swarm(daemons: list[Dockerd]) -> list[Node]:
    t0 = time.monotonic()
    for d in daemons:
        d.start()
    for d in daemons:
        d.wait_ready()
    first = daemons[0]
    first.docker("swarm", "init", "--advertise-addr", first.host.ip,
                 "--listen-addr", f"{first.host.ip}:2377")
    tokens = {role: first.docker("swarm", "join-token", "-q", role).stdout.strip()
              for role in ("manager", "worker")}
    for i, d in enumerate(daemons[1:], start=1):
        role = "manager" if i < MANAGERS else "worker"
        d.docker("swarm", "join", "--token", tokens[role], "--advertise-addr", d.host.ip,
                 "--listen-addr", f"{d.host.ip}:2377", f"{first.host.ip}:2377", timeout=120)

    def all_ready() -> list[list[str]] | None:
        rows = [line.split("|") for line in first.docker(
            "node", "ls", "--format",
            "{{.ID}}|{{.Hostname}}|{{.Status}}|{{.ManagerStatus}}").stdout.splitlines()]
        ok = len(rows) == len(daemons) and all(r[2] == "Ready" for r in rows)
        return rows if ok else None

    rows = wait_until(all_ready, timeout=120, interval=0.5,
                      what=f"{len(daemons)} nodes Ready in `docker node ls` on "
                           f"{first.host.name}")
    say(f"swarm: {MANAGERS} managers + {WORKERS} workers Ready on "
        f"{daemons[0].host.name}..{daemons[-1].host.name} in {time.monotonic() - t0:.1f} s")
    for r in rows:
        say(f"  docker node ls: {' '.join(x or '-' for x in r)}")
    return [Node("swarm", d.host, d.pid) for d in daemons]


def swarm_roles(nodes: list[Node], daemons: list[Dockerd]) -> None:
    first = daemons[0]
    status: dict[str, str] = {}
    for line in first.docker("node", "ls", "--format",
                             "{{.ID}}|{{.ManagerStatus}}").stdout.splitlines():
        nid, _, manager_status = line.partition("|")
        status[nid] = manager_status
    for n, d in zip(nodes, daemons, strict=True):
        ms = status.get(d.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip())
        n.role = "?" if ms is None else "leader" if ms == "Leader" else \
            "manager" if ms else "worker"


# ---------------------------------------------------------------------------------------------
# The window and the report


def measure(nodes: list[Node], window: float) -> tuple[float, float]:
    """Sample every node at the start and end of ``window`` s: (seconds, machine busy %)."""
    procs = all_procs()
    for n in nodes:
        n.before = n.sample(procs)
    busy0, total0 = busy_ticks()
    t0 = time.monotonic()
    time.sleep(window)
    took = time.monotonic() - t0
    busy1, total1 = busy_ticks()
    procs = all_procs()
    for n in nodes:
        n.after = n.sample(procs)
    ncpu = os.cpu_count() or 1
    return took, 100.0 * ncpu * (busy1 - busy0) / max(1, total1 - total0)


def pct(seconds: float, took: float) -> float:
    return 100.0 * seconds / took


def report(nodes: list[Node], took: float) -> None:
    print()
    print(f"{'system':6} {'node':4} {'role':8} {'cpu %':>7} {'rss MiB':>8} {'thr':>4} "
          f"{'churn':>5}  per process: cpu % / rss MiB")
    for n in nodes:
        by_comm = n.cpu_by_comm()
        rss: dict[str, int] = {}
        for p in n.after:
            rss[p.comm] = rss.get(p.comm, 0) + p.rss
        detail = "  ".join(f"{c} {pct(s, took):.2f}/{rss[c] / (1 << 20):.1f}"
                           for c, s in by_comm.items())
        print(f"{n.system:6} {n.host.name:4} {n.role:8} {pct(sum(by_comm.values()), took):7.2f} "
              f"{n.rss_mib():8.1f} {sum(p.threads for p in n.after):4d} {n.churn():5d}  {detail}")
    print()
    systems = [s for s in ("shoal", "swarm") if any(n.system == s for n in nodes)]
    groups = (("leader", ("leader",)), ("managers (not leader)", ("manager",)),
              ("all managers", ("leader", "manager")), ("workers", ("worker",)),
              ("all nodes", ("leader", "manager", "worker")))
    head = "".join(f"{s + ' cpu %':>12}{s + ' MiB':>11}" for s in systems)
    both = len(systems) == 2
    print(f"{'median':22}{head}" + (f"{'cpu shoal/swarm':>17}{'rss shoal/swarm':>17}"
                                    if both else ""))
    for label, roles in groups:
        line = f"{label:22}"
        med: dict[str, tuple[float, float]] = {}
        for s in systems:
            sel = [n for n in nodes if n.system == s and n.role in roles]
            if not sel:
                line += f"{'-':>12}{'-':>11}"
                continue
            c = statistics.median(pct(sum(n.cpu_by_comm().values()), took) for n in sel)
            r = statistics.median(n.rss_mib() for n in sel)
            med[s] = (c, r)
            line += f"{c:9.2f} n{len(sel)}{r:11.1f}"
        if both and len(med) == 2:
            (c1, r1), (c2, r2) = med["shoal"], med["swarm"]
            line += f"{_ratio(c1, c2):>17}{_ratio(r1, r2):>17}"
        print(line)
    print()
    print("cores: nothing is pinned; the kernel moves every thread between cores. "
          "Cpus_allowed_list and the cores each process's threads last ran on (end of window):")
    for n in nodes:
        parts = []
        for p in n.after:
            last = ",".join(str(c) for c in sorted(thread_cpus(p.pid))) or "?"
            parts.append(f"{p.comm}[{p.pid}] allowed {p.allowed} last {last}")
        print(f"  {n.system} {n.host.name}: " + "; ".join(parts))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "inf" if a > 0 else "-"


# ---------------------------------------------------------------------------------------------


def docker_processes() -> set[tuple[int, int]]:
    """Every dockerd/containerd process on the machine, as (pid, start time)."""
    return {p.key for p in all_procs().values() if p.comm.startswith(("dockerd", "containerd"))}


def run(args: argparse.Namespace, lab: Lab, daemons: list[Dockerd]) -> None:
    want_shoal = args.only in ("both", "shoal")
    want_swarm = args.only in ("both", "swarm")
    nodes: list[Node] = []
    if want_shoal:
        nodes += form_shoal(lab, lab.hosts[:MANAGERS + WORKERS])
    if want_swarm:
        hosts = lab.hosts[-(MANAGERS + WORKERS):]
        daemons += [Dockerd(h) for h in hosts]
        swarm_nodes = form_swarm(daemons)
        nodes += swarm_nodes
    say(f"settling {args.settle:.0f} s {machine()}")
    time.sleep(args.settle)
    if want_shoal:
        shoal_roles([n for n in nodes if n.system == "shoal"])
    if want_swarm:
        swarm_roles(swarm_nodes, daemons)
    say(f"window of {args.window:.0f} s starts {machine()}")
    took, busy = measure(nodes, args.window)
    say(f"window ends after {took:.1f} s {machine()}")
    say(f"whole machine busy {busy:.1f} % of one core during the window "
        f"({os.cpu_count()} cores; both clusters and everything else on it)")
    before = {n.host.name: n.role for n in nodes}  # a leader change in the window shows here
    if want_shoal:
        shoal_roles([n for n in nodes if n.system == "shoal"])
    if want_swarm:
        swarm_roles(swarm_nodes, daemons)
    changed = [f"{n.system} {n.host.name} {before[n.host.name]} -> {n.role}" for n in nodes
               if before[n.host.name] != n.role]
    say(f"roles changed during the window: {', '.join(changed)}" if changed
        else "roles unchanged during the window")
    report(nodes, took)


def cleanup(lab: Lab, daemons: list[Dockerd], cgroups_before: set[Path],
            globals_before: dict[str, str], procs_before: set[tuple[int, int]]) -> list[str]:
    """Undo everything, in order: dockerds, their mounts, their cgroups, the lab. SIGINT and
    SIGTERM are held back meanwhile. Returns what is left or went wrong (empty = clean)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    problems: list[str] = []
    try:
        if daemons:
            t0 = time.monotonic()
            for d in daemons:  # all at once, then wait for each
                d.terminate()
            for d in daemons:
                problems += d.stop()
            say(f"stopped {len(daemons)} dockerd (SIGTERM by pid) and their containerd in "
                f"{time.monotonic() - t0:.1f} s")
        dirs = [d.dir for d in daemons]
        unmounted, bad = unmount_under(dirs)
        problems += bad
        if unmounted:
            say(f"unmounted {len(unmounted)} mount(s) dockerd left: {', '.join(unmounted)}")
        removed, bad = remove_new_cgroups(cgroups_before)
        problems += bad
        if removed:
            say(f"removed {len(removed)} cgroup(s) dockerd made: {', '.join(removed)}")
        problems += lab.close()
        removed = remove_new_global_dirs(globals_before)
        if removed:
            say(f"removed empty dirs dockerd/containerd create at fixed global paths: "
                f"{', '.join(removed)}")
        # verification
        problems += [f"process {pid} (dockerd/containerd) still running"
                     for pid, _ in sorted(docker_processes() - procs_before)]
        problems += [f"netns {ns}" for ns in list_netns() if ns.startswith("shoal-lab-")
                     and lab.runid in ns]
        problems += [f"mount {m}" for m in _mountpoints() if _under(m, lab.root)]
        after = global_state()
        problems += [f"global {k}: {globals_before[k]} before, {v} after"
                     for k, v in after.items() if globals_before.get(k) != v]
        problems += [f"cgroup {p} (new)" for p in sorted(docker_cgroups() - cgroups_before)]
        return problems
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--window", type=float, default=60.0, help="measured window, s")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="s to wait after both clusters formed, before the window")
    ap.add_argument("--only", choices=("both", "shoal", "swarm"), default="both")
    ap.add_argument("--raft-multiplier", type=float, default=1.0,
                    help="the agents' --raft-multiplier (default 1)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, dockerd)", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    n_hosts = (MANAGERS + WORKERS) * (2 if args.only == "both" else 1)
    if args.only != "shoal":
        ensure_docker()
    say(f"machine: {os.cpu_count()} cores, kernel {os.uname().release} {machine()}")
    say(f"versions: {versions()}")
    globals_before = global_state()
    cgroups_before = docker_cgroups()
    procs_before = docker_processes()  # someone else's: never touched, not counted as ours
    if procs_before:
        say(f"note: {len(procs_before)} dockerd/containerd process(es) were already running "
            "(not this run's: left alone)")
    daemons: list[Dockerd] = []
    lab = Lab(n_hosts, agent_args=multiplier_args(args.raft_multiplier))
    os.environ["DOCKER_CONFIG"] = str(lab.root / "docker-cli")  # the CLI writes nothing global
    rc = 0
    try:
        run(args, lab, daemons)
    except (CommandError, LabError, AssertionError) as exc:
        say(f"FAILED: {exc}")
        rc = 1
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc or 'Ctrl-C'}): cleaning up")
        rc = 130
    finally:
        problems = cleanup(lab, daemons, cgroups_before, globals_before, procs_before)
    if problems:
        say("cleanup: NOT clean:")
        for p in problems:
            print(f"  {p}")
        return rc or 1
    say("cleanup: no dockerd/containerd left, lab netns/veths/mounts/data dir gone, "
        "global paths and sysctls unchanged")
    return rc


if __name__ == "__main__":
    sys.exit(main())
