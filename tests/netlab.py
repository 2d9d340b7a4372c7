"""A multi-host lab on one machine: N "hosts" as network namespaces on a private bridge.

Owns: the lab's network namespaces, veth pairs and bridge, the processes it starts in them
(shoal agents, helper processes), the task processes those agents record under their data dirs,
and the data dirs themselves. Used by the pytest fixtures (``tests/conftest.py``) and by
``demo/demo.py``.

Must not touch: anything it did not create. Traffic stays inside the lab: the bridge lives in its
own "switch" namespace and nothing in the root namespace gets an address on the lab subnet.

Layout of a lab with run id ``RID`` (6 hex digits)::

    netns shoal-lab-RID-sw : bridge slRIDbr, ports slRIDh1s, slRIDh2s, ...
    netns shoal-lab-RID-h1 : lo, slRIDh1 (10.77.0.11/24)  <-veth->  slRIDh1s
    netns shoal-lab-RID-h2 : lo, slRIDh2 (10.77.0.12/24)  <-veth->  slRIDh2s
    data dirs BASE/shoal-lab-RID/h1, .../h2, ...      state file STATE_DIR/RID.json

The state file records the owning process (pid + start time) and everything the lab made, so
that ``sweep()`` can remove what a crashed run left (owner dead) without touching a live lab
(owner alive). The state file, finding a lab's processes, teardown and sweep are
tests/labstate.py's; this module builds labs and drives their hosts (``Lab``, ``Host``) and
re-exports labstate's public names (``from netlab import LabError, pid_alive, sweep`` ...).

Errors (the classes are labstate's)::

    LabError            setup or teardown failed (message says what and why)
     └─ CommandError    a command run in a host failed (carries argv, rc, stdout, stderr)
    AssertionError      wait_until() gave up (names what it waited for and the last value)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from labstate import (  # (re-exported: tests import these from netlab)
    ENV_MARKER,
    IF_PREFIX,
    NETNS_PREFIX,
    STATE_DIR,
    CommandError,
    LabError,
    _become_subreaper,
    _leftovers,
    _now_ticks,
    _proc_info,
    _run,
    _State,
    _state_path,
    _task_ids,
    _teardown,
    _write_state,
    netns_pids,
    sweep,
)
from labstate import ProcInfo as ProcInfo
from labstate import _alive as _alive
from labstate import _all_procs as _all_procs
from labstate import _lab_targets as _lab_targets
from labstate import _read_bytes as _read_bytes
from labstate import _task_shims as _task_shims
from labstate import list_netns as list_netns
from labstate import pid_alive as pid_alive
from labstate import remove_empty_cgroup_parents as remove_empty_cgroup_parents

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
# `service` commands that wait for convergence unless -d (shoal.cli.progress)
WAITING = frozenset({"create", "update", "scale", "rollback"})
FAULT_CHAIN = "SHOALFAULT"  # a host's iptables chain of injected faults (Host.block/lose)
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
# Hosts per lab: interface names stay within IFNAMSIZ (sl + runid + h240 + s = 13 characters)
# and the addresses within one /24 from .11 (bench/scale_lab.py runs 105).
MAX_HOSTS = 240


def shoal_bin() -> Path:
    """The ``shoal`` executable the lab runs: $SHOAL_BIN, the repo's venv, or the one on PATH."""
    env = os.environ.get("SHOAL_BIN")
    if env:
        return Path(env)
    venv = REPO / ".venv" / "bin" / "shoal"
    if venv.exists():
        return venv
    found = shutil.which("shoal")
    if found:
        return Path(found)
    return Path(sys.executable).parent / "shoal"


def wait_until(pred: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2,
               what: str = "condition") -> T:
    """Call ``pred`` until it returns something truthy and return that; raise AssertionError
    naming ``what`` and the last value (or exception) after ``timeout`` seconds.

    Exceptions from ``pred`` count as "not yet" (e.g. a CLI call while the cluster is electing).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = pred()
        except Exception as exc:  # retried; reported below
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; "
                                 f"last value: {last!r}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Hosts and labs


# Host.http_get's script: GET each URL (argv[2:]) with a timeout of argv[1] s; print one JSON
# list of [status or repr(error), body].
_HTTP_GET = r"""
import json, sys, urllib.request
out = []
for url in sys.argv[2:]:
    try:
        with urllib.request.urlopen(url, timeout=float(sys.argv[1])) as r:
            out.append([r.status, r.read().decode().strip()])
    except Exception as exc:
        out.append([repr(exc), ""])
print(json.dumps(out))
"""


class Host:
    """One lab host: a network namespace with one address, a data dir and (maybe) an agent."""

    def __init__(self, lab: Lab, index: int, ip: str) -> None:
        self.lab = lab
        self.name = f"h{index}"
        self.ip = ip
        self.netns = f"{NETNS_PREFIX}{lab.runid}-{self.name}"
        self.ifname = f"{IF_PREFIX}{lab.runid}{self.name}"  # host end of the veth
        self.port = f"{self.ifname}s"  # switch end (bridge port)
        self.data_dir = lab.root / self.name
        self.sock = self.data_dir / "shoal.sock"
        self.agent_log = self.data_dir / "agent.log"
        self._agent: subprocess.Popen[bytes] | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        # how this host runs shoal (agent and CLI): None = the lab's executable; see use_shoal()
        self._shoal_argv: list[str] | None = None
        self._shoal_env: dict[str, str] = {}
        # given to this host's agent after the lab's agent_args (e.g. its own --cgroup-parent)
        self.agent_args: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} {self.netns}>"

    # -- processes ------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self._shoal_env, ENV_MARKER: self.lab.runid,
                "PYTHONUNBUFFERED": "1"}

    def use_shoal(self, argv: Sequence[str] | None = None,
                  env: dict[str, str] | None = None) -> None:
        """Run shoal on this host (agents started from now on, and the CLI) as ``argv`` with
        ``env`` added to the environment, e.g. another release (tests/oldrelease.py);
        ``use_shoal()`` goes back to the lab's executable. A running agent is not touched."""
        self._shoal_argv = list(argv) if argv is not None else None
        self._shoal_env = dict(env or {})

    @property
    def shoal_argv(self) -> list[str]:
        """The command that runs shoal on this host."""
        return list(self._shoal_argv) if self._shoal_argv else [str(self.lab.shoal)]

    def spawn(self, *argv: str, log_name: str = "spawn", hostname: bool = False,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in this host's netns (own session, stdin /dev/null,
        stdout+stderr appended to DATA_DIR/<log_name>.log). The lab kills it on close.
        ``hostname=True`` runs it in its own UTS namespace with the host's name as hostname.
        Entered with ``nsenter --net`` rather than ``ip netns exec``: the latter remounts /sys
        in a private mount namespace, hiding the cgroup hierarchies the runtime needs."""
        cmd = ["nsenter", f"--net=/var/run/netns/{self.netns}", "--"]
        if hostname:
            cmd += ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name]
        cmd += list(argv)
        log = self.data_dir / f"{log_name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                    cwd=cwd or self.data_dir, env=self._env(),
                                    start_new_session=True)
        self._spawned.append(proc)
        info = _proc_info(proc.pid)
        self.lab._record_proc(proc.pid, info.start if info else 0)
        return proc

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside this host's netns and capture its output."""
        cmd = ["ip", "netns", "exec", self.netns, *argv]
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=self._env(),
                              start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # a grandchild left the group, holds the pipe
                    out, err = "", ""
                raise CommandError(cmd, None, out, err, f"{timeout}s") from None
            except BaseException:  # Ctrl-C / SIGTERM handler: do not leave the command running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandError(cmd, proc.returncode, out, err)
        return res

    def pids(self) -> list[int]:
        """Processes in this host's network namespace (tasks have their own netns: not here)."""
        return netns_pids(self.netns)

    # -- the shoal agent ------------------------------------------------------------------

    def start_agent(self, *extra: str, timeout: float = 30.0) -> None:
        """Start ``shoal agent`` in this host and wait until its unix socket accepts."""
        self.spawn_agent(*extra)
        deadline = time.monotonic() + timeout
        while not self.agent_serving():  # LabError with its log if it exited
            if time.monotonic() > deadline:
                self.kill_agent()
                raise LabError(f"{self.name}: agent did not accept on {self.sock} within "
                               f"{timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def agent_pid(self) -> int | None:
        return self._agent.pid if self._agent is not None else None

    def agent_alive(self) -> bool:
        return self._agent is not None and self._agent.poll() is None

    def kill_agent(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        """Send ``sig`` to the agent (by pid only: its tasks keep running) and wait for it to
        exit. Returns its exit status, or None if no agent ran."""
        proc = self._agent
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.name}: agent pid {proc.pid} still running {timeout}s after "
                           f"signal {sig}") from exc

    def spawn_agent(self, *extra: str) -> None:
        """Start ``shoal agent`` in this host without waiting for it (see
        :meth:`Lab.start_agents`, which starts many at once and then waits)."""
        if self.agent_alive():
            raise LabError(f"{self.name}: agent already running (pid {self.agent_pid})")
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a stale socket from a killed agent would look ready
        self._agent = self.spawn(
            *self.shoal_argv, "agent", "--data-dir", str(self.data_dir),
            "--advertise-addr", self.ip, *self.lab.agent_args, *self.agent_args, *extra,
            log_name="agent", hostname=True)

    def agent_serving(self) -> bool:
        """The agent's unix socket accepts (LabError if the agent exited)."""
        if self._agent is None or self._agent.poll() is not None:
            code = self._agent.returncode if self._agent is not None else None
            raise LabError(f"{self.name}: agent exited with {code}\n{self.log_tail()}")
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def restart_agent(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        self.kill_agent(sig)
        self.start_agent(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.agent_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(no agent log: {exc})"
        return f"--- {self.agent_log} (last {len(text)} lines) ---\n" + "\n".join(text)

    # -- the CLI --------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0, wait: bool = False
            ) -> subprocess.CompletedProcess[str]:
        """``shoal -H unix://SOCK ARGS`` inside this host; CommandError on failure if check.
        `service create|update|scale|rollback` get ``-d`` (they return at once, as the tests
        written before the CLI waited expect: they poll for what they check) unless ``wait``
        (the test checks the wait itself) or the test passes ``-d``/``--detach``, or the host
        runs another release's shoal (``use_shoal``: it returns at once and knows no -d)."""
        if not wait and not self._shoal_argv and args[:1] == ("service",) and args[1:2] \
                and args[1] in WAITING and not {"-d", "--detach"} & set(args):
            args = (*args[:2], "-d", *args[2:])
        return self.run(*self.shoal_argv, "-H", f"unix://{self.sock}", *args,
                        check=check, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 30.0) -> Any:
        res = self.cli(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise CommandError(list(res.args), res.returncode, res.stdout,
                               f"{res.stderr}\n(stdout is not JSON: {exc})") from exc

    def http_get(self, *urls: str, url_timeout: float = 10.0, timeout: float = 120.0
                 ) -> list[tuple[Any, str]]:
        """GET each of ``urls`` from inside this host, one after another: (status, body), or
        (repr of the error, "") for one that failed; ``url_timeout`` s each, ``timeout`` s in
        all (CommandError past it)."""
        res = self.run("python3", "-c", _HTTP_GET, str(url_timeout), *urls, timeout=timeout)
        return [(status, body) for status, body in json.loads(res.stdout)]

    # -- the network ----------------------------------------------------------------------

    def cut_link(self) -> None:
        """Unplug this host: its bridge port goes down, packets to and from it are dropped
        (peers see timeouts, like a pulled cable). Loopback and the unix socket keep working."""
        _run(["ip", "-n", self.lab.switch_netns, "link", "set", self.port, "down"], check=True)

    def restore_link(self) -> None:
        _run(["ip", "-n", self.lab.switch_netns, "link", "set", self.port, "up"], check=True)

    # -- faults (the fault suite, tests/jepsen.py): iptables rules in this host's netns only,
    # in their own chain; they vanish with the namespace ----------------------------------

    def _iptables(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(["nsenter", f"--net=/var/run/netns/{self.netns}", "--", "iptables", "-w",
                     *args], check=True)

    def _fault_chain(self) -> None:
        if _run(["nsenter", f"--net=/var/run/netns/{self.netns}", "--", "iptables", "-w",
                 "-n", "-L", FAULT_CHAIN]).returncode != 0:
            self._iptables("-N", FAULT_CHAIN)
            self._iptables("-I", "INPUT", "-j", FAULT_CHAIN)

    def block(self, ips: Iterable[str]) -> None:
        """Drop every packet arriving from ``ips`` (one side of a partition; the peers'
        packets to it still leave, like a one-way link failure, unless they block too)."""
        self._fault_chain()
        for ip in ips:
            self._iptables("-A", FAULT_CHAIN, "-s", ip, "-j", "DROP")

    def lose(self, probability: float) -> None:
        """Drop each arriving packet with ``probability`` (iptables' statistic match: the
        kernel here has no netem)."""
        self._fault_chain()
        self._iptables("-A", FAULT_CHAIN, "-m", "statistic", "--mode", "random",
                       "--probability", f"{probability:.4f}", "-j", "DROP")

    def throttle(self, rate: str) -> None:
        """Limit what this host sends to ``rate`` (e.g. ``"512kbit"``): a token bucket (tc
        tbf) on its interface, in its own namespace; queued beyond 400 ms is dropped."""
        _run(["tc", "-n", self.netns, "qdisc", "replace", "dev", self.ifname, "root", "tbf",
              "rate", rate, "burst", "32kbit", "latency", "400ms"], check=True)

    def heal(self) -> None:
        """Remove every rule block() and lose() added, and a throttle()."""
        self._fault_chain()
        self._iptables("-F", FAULT_CHAIN)
        _run(["tc", "-n", self.netns, "qdisc", "del", "dev", self.ifname, "root"])  # (none: fails)

    def pause_agent(self) -> None:
        """SIGSTOP the agent (its Raft, gossip and API freeze; the kernel keeps its sockets)."""
        if self._agent is not None and self._agent.poll() is None:
            os.kill(self._agent.pid, signal.SIGSTOP)

    def resume_agent(self) -> None:
        if self._agent is not None and self._agent.poll() is None:
            os.kill(self._agent.pid, signal.SIGCONT)

    def _reap(self) -> None:
        for proc in self._spawned:
            proc.poll()
        self._spawned = [p for p in self._spawned if p.returncode is None]


class Lab:
    """N hosts (network namespaces) on one bridge that lives in its own "switch" namespace.

    ``Lab(3)`` builds h1..h3 with 10.77.0.11..13/24. Use as a context manager or call close();
    close() removes everything the lab made, also after a failure.

    ``routed=("10.78.0.0/24", K)``: hosts from the K-th (0-based) on sit on a second bridge
    with addresses from that subnet, and the switch namespace routes between the two bridges
    (router .1 on each): two routed subnets, no shared L2 segment.

    ``point_to_point=True`` (the lighter mode, for bench/scale_lab.py's 100+ hosts): no bridge;
    each host has its address as a /32 on its veth, the subnet routed via the switch (.1 on
    every switch port, a /32 route per host there). Why: the kernel's ARP table is one table
    for all namespaces (net.ipv4.neigh.default.gc_thresh3 = 1024 entries machine-wide), and on
    one bridge every host that gossips with every other keeps an entry per peer: 105 bridged
    hosts (~100² entries) overflowed it ("neighbor table overflow"), so new hosts could not
    reach anyone — and neither could other labs on the machine. Point to point, each host
    has one neighbour (the switch) and the switch one per host. The price: peers are not
    on-link, so routes "via a peer" (the cluster network's per-node task subnets,
    shoal.node.network) are refused: tasks on different hosts cannot talk in this mode.
    """

    def __init__(self, n_hosts: int, base_dir: Path | str | None = None, *,
                 subnet: str = "10.77.0.0/24", first_host: int = 11,
                 shoal: Path | None = None, keep_data: bool = False,
                 routed: tuple[str, int] | None = None, point_to_point: bool = False,
                 agent_args: Sequence[str] = ()) -> None:
        if routed is not None and point_to_point:
            raise LabError("routed and point_to_point do not combine")
        self.point_to_point = point_to_point
        self.agent_args = tuple(agent_args)  # given to every agent this lab starts
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise LabError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
        net = ipaddress.ip_network(subnet)
        split = routed[1] if routed is not None else n_hosts
        net2 = ipaddress.ip_network(routed[0]) if routed is not None else net
        addrs = [net.network_address + first_host + i if i < split else
                 net2.network_address + first_host + i - split for i in range(n_hosts)]
        if any((a not in net and a not in net2) or a in (net.broadcast_address,
                                                         net2.broadcast_address)
               for a in addrs):
            raise LabError(f"{n_hosts} hosts from .{first_host} do not fit in {subnet}")
        self.routed = (net2, split) if routed is not None else None
        self.shoal = shoal or shoal_bin()
        _become_subreaper()
        self.subnet = net
        self.closed = False
        self._task_ids: set[str] = set()  # seen under tasks/: their cgroups are ours too
        base = Path(base_dir) if base_dir is not None else STATE_DIR
        base.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            self.runid = secrets.token_hex(3)
            self.root = base.resolve() / f"{NETNS_PREFIX}{self.runid}"
            if self.root.exists():
                continue
            self.switch_netns = f"{NETNS_PREFIX}{self.runid}-sw"
            self.bridge = f"{IF_PREFIX}{self.runid}br"
            self.hosts = [Host(self, i + 1, str(a)) for i, a in enumerate(addrs)]
            self._state = _State(
                runid=self.runid, owner_pid=os.getpid(), owner_start=self._own_start(),
                created_ticks=_now_ticks(), root=str(self.root),
                switch_netns=self.switch_netns, keep_data=keep_data,
                hosts=[{"name": h.name, "ip": h.ip, "netns": h.netns, "port": h.port,
                        "data_dir": str(h.data_dir)} for h in self.hosts])
            try:
                _write_state(self._state, exclusive=True)
            except FileExistsError:
                continue
            break
        else:
            raise LabError("could not pick a free lab run id")
        sock_len = len(str(self.hosts[0].sock).encode())
        try:
            if sock_len > _SUN_PATH_MAX:
                raise LabError(f"unix socket path {self.hosts[0].sock} is {sock_len} bytes "
                               f"(max {_SUN_PATH_MAX}): use a shorter base_dir")
            self._build()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _own_start() -> int:
        info = _proc_info(os.getpid())
        assert info is not None
        return info.start

    def _build(self) -> None:
        self.root.mkdir()
        sw = self.switch_netns
        _run(["ip", "netns", "add", sw], check=True)
        _run(["ip", "-n", sw, "link", "set", "lo", "up"], check=True)
        if self.point_to_point:
            self._build_point_to_point()
            return
        _run(["ip", "-n", sw, "link", "add", self.bridge, "type", "bridge"], check=True)
        _run(["ip", "-n", sw, "link", "set", self.bridge, "up"], check=True)
        prefix = self.subnet.prefixlen
        bridge_of = {h.name: self.bridge for h in self.hosts}
        if self.routed is not None:  # a second bridge, the switch routing between them
            net2, split = self.routed
            bridge2 = self.bridge[:-2] + "b2"
            _run(["ip", "-n", sw, "link", "add", bridge2, "type", "bridge"], check=True)
            _run(["ip", "-n", sw, "link", "set", bridge2, "up"], check=True)
            for br, net in ((self.bridge, self.subnet), (bridge2, net2)):
                _run(["ip", "-n", sw, "addr", "add", f"{net.network_address + 1}/"
                      f"{net.prefixlen}", "dev", br], check=True)
            _run(["ip", "netns", "exec", sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                 check=True)  # (the switch namespace's own setting)
            for h in self.hosts[split:]:
                bridge_of[h.name] = bridge2
        for i, h in enumerate(self.hosts):
            h.data_dir.mkdir()
            _run(["ip", "netns", "add", h.netns], check=True)
            # Both ends are created directly in their namespaces: nothing touches the root netns.
            _run(["ip", "-n", sw, "link", "add", h.port, "type", "veth", "peer", "name",
                  h.ifname, "netns", h.netns], check=True)
            _run(["ip", "-n", sw, "link", "set", h.port, "master", bridge_of[h.name], "up"],
                 check=True)
            if self.routed is not None and i >= self.routed[1]:
                prefix = self.routed[0].prefixlen
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.ip}/{prefix}", "dev", h.ifname],
                 check=True)
            _run(["ip", "-n", h.netns, "link", "set", h.ifname, "up"], check=True)
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"], check=True)
            if self.routed is not None:  # (a route to the other subnet only: no default)
                mine, other = (self.subnet, self.routed[0]) if i < self.routed[1] else \
                    (self.routed[0], self.subnet)
                _run(["ip", "-n", h.netns, "route", "add", str(other), "via",
                      str(mine.network_address + 1)], check=True)

    def _build_point_to_point(self) -> None:
        sw = self.switch_netns
        gw = str(self.subnet.network_address + 1)
        _run(["ip", "netns", "exec", sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
             check=True)  # (the switch namespace's own setting)
        for h in self.hosts:
            h.data_dir.mkdir()
            _run(["ip", "netns", "add", h.netns], check=True)
            _run(["ip", "-n", sw, "link", "add", h.port, "type", "veth", "peer", "name",
                  h.ifname, "netns", h.netns], check=True)
            _run(["ip", "-n", sw, "addr", "add", f"{gw}/32", "dev", h.port], check=True)
            _run(["ip", "-n", sw, "link", "set", h.port, "up"], check=True)
            _run(["ip", "-n", sw, "route", "add", f"{h.ip}/32", "dev", h.port], check=True)
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.ip}/32", "dev", h.ifname],
                 check=True)
            _run(["ip", "-n", h.netns, "link", "set", h.ifname, "up"], check=True)
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"], check=True)
            _run(["ip", "-n", h.netns, "route", "add", f"{gw}/32", "dev", h.ifname],
                 check=True)
            _run(["ip", "-n", h.netns, "route", "add", str(self.subnet), "via", gw],
                 check=True)

    def _record_proc(self, pid: int, start: int) -> None:
        self._state.procs.append({"pid": pid, "start": start})
        _write_state(self._state)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def host(self, name_or_ip: str) -> Host:
        """The host named ``h2`` or addressed ``10.77.0.12`` (``IP:PORT`` accepted)."""
        key = name_or_ip.rsplit(":", 1)[0] if name_or_ip.count(":") == 1 else name_or_ip
        for h in self.hosts:
            if key in (h.name, h.ip):
                return h
        raise LabError(f"no lab host {name_or_ip!r}")

    # -- cluster helpers (need the shoal agent) ----------------------------------------------

    def form_cluster(self, managers: int = 3, workers: int = 0, timeout: float = 60.0,
                     api_port: int = 2377) -> list[dict[str, Any]]:
        """Start agents on the first managers+workers hosts (those not running one yet, all at
        once), ``init`` on h1, join the next managers-1 hosts as managers and the rest as
        workers; wait until ``node ls`` on h1 shows them all ready. Returns that node list."""
        n = managers + workers
        if managers < 1 or n > len(self.hosts):
            raise LabError(f"cannot form {managers} managers + {workers} workers "
                           f"from {len(self.hosts)} hosts")
        members = self.hosts[:n]
        self.start_agents([h for h in members if not h.agent_alive()], timeout=timeout)
        first = members[0]
        first.cli("init")
        tokens = {role: first.cli("join-token", role, "-q").stdout.strip()
                  for role in ("manager", "worker")}
        for i, h in enumerate(members[1:], start=1):
            role = "manager" if i < managers else "worker"
            h.cli("join", "--token", tokens[role], f"{first.ip}:{api_port}", timeout=timeout)

        def all_ready() -> list[dict[str, Any]] | None:
            nodes: list[dict[str, Any]] = first.cli_json("node", "ls")
            ready = [x for x in nodes if x.get("state") == "ready"]
            return nodes if len(nodes) == n and len(ready) == n else None

        return wait_until(all_ready, timeout=timeout, interval=0.3,
                          what=f"{n} nodes ready in `node ls` on {first.name}")

    def start_agents(self, hosts: Sequence[Host], *extra: str, batch: int = 10,
                     timeout: float = 300.0) -> None:
        """Start agents on many hosts, ``batch`` starting at a time (an agent's start is
        mostly CPU: imports), and wait until every socket accepts."""
        deadline = time.monotonic() + timeout
        for i in range(0, len(hosts), batch):
            group = hosts[i:i + batch]
            for h in group:
                h.spawn_agent(*extra)
            waiting = list(group)
            while waiting:  # an agent that exits raises LabError at once
                waiting = [h for h in waiting if not h.agent_serving()]
                if waiting and time.monotonic() > deadline:
                    raise LabError(f"agents of {', '.join(h.name for h in waiting)} not "
                                   f"serving after {timeout}s\n{waiting[0].log_tail()}")
                time.sleep(0.1)

    # -- teardown ---------------------------------------------------------------------------

    def _reap(self) -> None:
        for h in self.hosts:
            h._reap()

    def _popen_pids(self) -> set[int]:
        return {p.pid for h in self.hosts for p in h._spawned}

    def leftovers(self) -> list[str]:
        """Everything of this lab still present: processes, netns, links, mounts, cgroups
        named after its tasks, data dir."""
        self._task_ids |= _task_ids(self._state)
        return _leftovers(self._state, self._task_ids)

    def _keep_logs(self) -> None:
        """With ``SHOAL_LAB_LOGS=DIR`` set, copy every host's agent log to DIR/<runid>/ before
        the teardown removes the data dirs (for hunting an intermittent failure)."""
        keep = os.environ.get("SHOAL_LAB_LOGS")
        if not keep:
            return
        dest = Path(keep) / self.runid
        dest.mkdir(parents=True, exist_ok=True)
        for h in self.hosts:
            with contextlib.suppress(OSError):
                shutil.copyfile(h.agent_log, dest / f"{h.name}.log")

    def close(self) -> list[str]:
        """Tear everything down (idempotent). SIGINT/SIGTERM are held back meanwhile so a second
        Ctrl-C cannot leave half a lab. Returns what could not be removed (empty = clean)."""
        if self.closed:
            return self.leftovers()
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._keep_logs()
            self._task_ids |= _task_ids(self._state)
            problems = _teardown(self._state, self._reap, self._popen_pids, self._task_ids)
            for h in self.hosts:
                for proc in h._spawned:  # all killed above: reap so no zombie/ResourceWarning
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                h._spawned = []
            left = self.leftovers()
            if not left and not problems:
                with contextlib.suppress(FileNotFoundError):
                    _state_path(self.runid).unlink()
            self.closed = True
            return problems + left
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/netlab.py sweep``: remove leftovers of dead labs."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["sweep"])
    parser.parse_args(argv)
    removed = sweep(verbose=True)
    print(f"sweep: {len(removed)} item(s) removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
