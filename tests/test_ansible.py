"""ansible/ end to end: the real ``ansible-playbook`` over SSH turns netns hosts into a cluster.

Hosts h1..h6 of a netlab Lab each run their own sshd (openssh-server, key-only, host keys and a
client key made by the test) in their own network namespace and hostname; h7 is the Ansible
controller (the lab's bridge is reachable only from inside the lab). The hosts share this
machine's filesystem, so the inventory gives each one its own data dir, venv, config dir and
pid file, all under the lab's root dir: ``Lab.close()`` then finds and removes everything
(sshd and agents live in the hosts' namespaces; task shims are recorded under the data dirs).
The role starts agents with ``shoal_service_manager: direct`` (no systemd here) and still
renders and ``systemd-analyze verify``-s the unit.

Owns: the lab's ssh keys, sshd configs, inventory, ansible.cfg, wheels and wheelhouse (all under
the lab dir, removed with it; ssh ControlMasters are closed with ``ssh -O exit``). It creates
/run/sshd (sshd's empty privilege-separation dir) if missing and leaves it: another sshd may use
it. Must not touch: the machine's own ssh configuration, ~/.ansible or ~/.ssh.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netlab import REPO, Host, Lab, wait_until
from write_load import CUT, TIMEOUT, RestartWatch, WriteLoad, windows

ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
PLAYBOOK_TIMEOUT = 240.0
CLUSTER_CIDR = "10.96.0.0/16"  # not shoal's default (10.99/16; VIPs 10.98/16): the role passes it
_RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                       r"failed=(\d+)", re.MULTILINE)


def _missing_tools() -> str | None:
    if not SSHD.exists():
        return "needs sshd (Debian package openssh-server; `make venv` installs it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package openssh-client)"
    for tool in ("ansible-playbook", "ansible-lint"):
        if not (BIN / tool).exists():
            return f"needs {tool} (pip install -e '.[test]')"
    return None


@dataclass
class PlaybookRun:
    rc: int
    output: str
    recap: dict[str, dict[str, int]]  # host -> ok/changed/unreachable/failed

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]

    def changed_tasks(self) -> list[str]:
        """``TASK [name]: changed: [host]`` lines, to explain a changed count."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line.split("]")[0] + "]"
            elif line.startswith("changed:"):
                out.append(f"{task} {line}")
        return out


class Fleet:
    """The lab's hosts as an Ansible fleet: sshd per host, a controller host, an inventory."""

    def __init__(self, lab: Lab, n_targets: int) -> None:
        self.lab = lab
        self.targets = lab.hosts[:n_targets]
        self.controller = lab.hosts[n_targets]
        self.work = lab.root / "ansible"
        self.work.mkdir(mode=0o700)
        for sub in ("cp", "home", "tmp", "wheelhouse"):
            (self.work / sub).mkdir(mode=0o700)
        self.key = self.work / "id_ed25519"
        self.inventory = self.work / "inventory.yml"
        self.cfg = self.work / "ansible.cfg"
        self.runs = 0

    # -- setup -------------------------------------------------------------------------

    def sysroot(self, host: Host) -> Path:
        """Where this host's "system" files go (its /opt, /etc, /run): beside its data dir."""
        return self.lab.root / f"sys-{host.name}"

    def start_sshd(self) -> None:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shoal-test", "-f",
              str(self.key)])
        (self.work / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        # sshd's (empty) privilege separation dir. Left in place: a concurrent run's sshd, or the
        # machine's own, may need it too.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        known = []
        for h in self.targets:
            d = self.work / h.name
            d.mkdir(mode=0o700)
            hostkey = d / "ssh_host_ed25519_key"
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f",
                  str(hostkey)])
            known.append(f"{h.ip} {hostkey.with_suffix('.pub').read_text().strip()}")
            cfg = d / "sshd_config"
            cfg.write_text("\n".join([
                f"ListenAddress {h.ip}:22",
                f"HostKey {hostkey}",
                "PidFile none",
                f"AuthorizedKeysFile {self.work / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # keys live under /tmp
                "UseDNS no",
                "Subsystem sftp internal-sftp",
                # bash, root's login shell, sources ~/.bashrc for a command sshd runs only
                # when it is a top-level shell (SHLVL < 2 once it counts itself): this
                # machine's /root/.bashrc (pyenv's init) cost ~0.15 s per SSH command, and
                # every module run is one (a site.yml re-run on 6 hosts: ~90)
                "SetEnv SHLVL=1",
                "",
            ]))
            h.spawn(str(SSHD), "-D", "-e", "-f", str(cfg), log_name="sshd", hostname=True)
        (self.work / "known_hosts").write_text("\n".join(known) + "\n")
        for h in self.targets:
            log = h.data_dir / "sshd.log"

            def listening(log: Path = log) -> bool:
                return "Server listening" in log.read_text()

            wait_until(listening, timeout=10, interval=0.05, what=f"sshd listening in {h.name}")

    def write_config(self) -> None:
        w = self.work
        ssh_args = " ".join([
            "-F /dev/null", "-o ControlMaster=auto", "-o ControlPersist=300s",
            f"-o UserKnownHostsFile={w / 'known_hosts'}", "-o GlobalKnownHostsFile=/dev/null",
            "-o StrictHostKeyChecking=yes", "-o BatchMode=yes", "-o IdentitiesOnly=yes",
            "-o ConnectTimeout=10",
        ])
        self.cfg.write_text("\n".join([
            "[defaults]",
            f"home = {w / 'home'}",
            f"local_tmp = {w / 'tmp'}",
            "interpreter_python = /usr/bin/python3",
            "host_key_checking = True",
            "retry_files_enabled = False",
            "forks = 10",
            "timeout = 20",
            "nocows = True",
            "",
            "[ssh_connection]",
            "pipelining = True",
            f"ssh_args = {ssh_args}",
            f"control_path_dir = {w / 'cp'}",
            "control_path = %(directory)s/%%C",
            "",
        ]))

    def copy_source(self, name: str) -> Path:
        """A copy of the repo's package sources to build from (no build/ dir in the work tree,
        and a version can be bumped without touching the repo)."""
        src = self.work / name
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
            ".venv", ".git", ".*_cache", ".hypothesis", ".demo", "build", "dist",
            "*.egg-info", "__pycache__", "tests", "bench", "demo", "docs", "ansible"))
        return src

    def build_wheels(self) -> tuple[Path, Path]:
        """Two shoal wheels, the repo's version and the same code as version ``X.post1`` (what
        upgrade.yml rolls out), and a wheelhouse of the dependencies pinned to this venv's
        versions, so that the hosts, which have no network, install offline
        (``--no-index --find-links``). The three pip runs go side by side (one after the
        other they took ~19 s)."""
        src, newer_src = self.copy_source("src"), self.copy_source("src-post1")
        version_py = newer_src / "node" / "version.py"  # pyproject's version is read from it
        text, n = re.subn(r'(?m)^VERSION = "([^"]+)"$', r'VERSION = "\1.post1"',
                          version_py.read_text())
        assert n == 1, "node/version.py: no VERSION line to bump"
        version_py.write_text(text)
        deps = tomllib.loads((src / "pyproject.toml").read_text())["project"]["dependencies"]
        pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check"]
        constraints = self.work / "constraints.txt"
        constraints.write_text(_run([*pip, "freeze", "--exclude-editable"]).stdout)
        dist1, dist2 = self.work / "dist1", self.work / "dist2"
        builds = {
            "shoal": [*pip, "wheel", "-q", "--no-deps", "-w", str(dist1), str(src)],
            "shoal-post1": [*pip, "wheel", "-q", "--no-deps", "-w", str(dist2), str(newer_src)],
            "wheelhouse": [*pip, "wheel", "-q", "-w", str(self.work / "wheelhouse"), "-c",
                           str(constraints), *deps],
        }
        with contextlib.ExitStack() as stack:
            procs = {name: stack.enter_context(_started(argv, self.work / f"pip-{name}.log"))
                     for name, argv in builds.items()}
            for name, proc in procs.items():
                rc = proc.wait(timeout=300)
                assert rc == 0, f"pip wheel ({name}) exited {rc}:\n" + \
                    (self.work / f"pip-{name}.log").read_text(errors="replace")
        shutil.rmtree(src)
        shutil.rmtree(newer_src)
        return next(dist1.glob("shoal-*.whl")), next(dist2.glob("shoal-*.whl"))

    def write_inventory(self, wheel: Path, managers: list[Host], workers: list[Host]) -> None:
        def host_vars(h: Host) -> dict[str, Any]:
            root = self.sysroot(h)
            return {
                "ansible_host": h.ip,
                "ansible_remote_tmp": str(root / "tmp"),
                "shoal_advertise_addr": h.ip,
                "shoal_data_dir": str(h.data_dir),
                "shoal_install_dir": str(root / "opt"),
                "shoal_venv_dir": str(root / "opt" / "venv"),
                "shoal_config_dir": str(root / "etc"),
                "shoal_systemd_unit_dir": str(root / "systemd"),
                "shoal_pid_file": str(root / "run" / "shoal-agent.pid"),
                "shoal_log_file": str(h.agent_log),  # conftest shows it when a test fails
            }

        inventory = {"all": {
            "vars": {
                "ansible_user": "root",
                "ansible_become": False,  # we log in as root; the hosts have no sudo
                "ansible_ssh_private_key_file": str(self.key),
                "shoal_service_manager": "direct",
                "shoal_apt_update_cache": False,  # no network in the hosts; packages are here
                "shoal_cli_link": "",  # one shared /usr/local/bin: no symlink
                "shoal_package_source": "wheel",
                "shoal_wheel_src": str(wheel),
                "shoal_pip_find_links": [str(self.work / "wheelhouse")],
                "shoal_pip_no_index": True,
                "shoal_cluster_cidr": CLUSTER_CIDR,
                "shoal_ready_timeout": int(os.environ.get("SHOAL_TEST_READY", "60")),
            },
            "children": {
                "shoal_managers": {"hosts": {h.name: host_vars(h) for h in managers}},
                "shoal_workers": {"hosts": {h.name: host_vars(h) for h in workers}},
            },
        }}
        # JSON is YAML: no PyYAML needed here.
        self.inventory.write_text(json.dumps(inventory, indent=1))

    # -- running Ansible ---------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_CONFIG=str(self.cfg), LC_ALL="C.UTF-8", LANG="C.UTF-8",
                   ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PYTHONUNBUFFERED="1")
        return env

    def playbook(self, name: str, *extra: str, timeout: float = PLAYBOOK_TIMEOUT) -> PlaybookRun:
        """Run ``ansible-playbook -i INVENTORY ansible/NAME`` on the controller host. Output
        goes to a file, not a pipe: ssh's ControlPersist masters outlive the run."""
        self.runs += 1
        log = self.work / f"run{self.runs}-{Path(name).stem}.log"
        argv = ["nsenter", f"--net=/var/run/netns/{self.controller.netns}", "--",
                str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(ANSIBLE_DIR / name),
                *extra]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=self.env(), cwd=self.work,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        output = log.read_text(errors="replace")
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]),
                        "failed": int(m[4])} for m in _RECAP_RE.findall(output)}
        return PlaybookRun(rc, output, recap)

    def close_masters(self) -> None:
        """``ssh -O exit`` every ControlMaster the runs left."""
        for h in self.targets:
            with contextlib.suppress(Exception):
                self.controller.run(
                    "ssh", "-F", "/dev/null", "-o", f"ControlPath={self.work / 'cp'}/%C",
                    "-O", "exit", f"root@{h.ip}", check=False, timeout=10)


@contextlib.contextmanager
def _started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` running in the background (output to ``log``); killed if still running when
    the block is left."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n"
                             f"{res.stderr}")
    return res


def ok(run: PlaybookRun) -> PlaybookRun:
    """Assert the run succeeded everywhere; show the end of its output otherwise."""
    failed = {h: r for h, r in run.recap.items() if r["failed"] or r["unreachable"]}
    if run.rc != 0 or failed or not run.recap:
        tail = "\n".join(run.output.splitlines()[-80:])
        raise AssertionError(f"ansible-playbook exited {run.rc}, failed: {failed}\n{tail}")
    return run


def nodes_by_host(h: Host) -> dict[str, dict[str, Any]]:
    return {n["hostname"]: n for n in h.cli_json("node", "ls")}


def running_tasks(h: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in h.cli_json("service", "ps", service)
            if t["state"] == "running" and t["desired_state"] == "running"]


def wait_running(h: Host, service: str, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        tasks = running_tasks(h, service)
        return tasks if len(tasks) == n else None

    return wait_until(check, timeout=timeout, interval=0.3,
                      what=f"{n} running tasks of {service} on {h.name}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fleet(lab_factory: Callable[..., Lab]) -> Iterator[Fleet]:
    why = _missing_tools()
    if why:  # `make test` installs them: missing tools are a broken set-up, not a skip
        pytest.fail(why)
    lab = lab_factory(7)
    f = Fleet(lab, n_targets=6)
    try:
        f.start_sshd()
        f.write_config()
        yield f
    finally:
        f.close_masters()  # then lab_factory closes the lab: sshd, agents, tasks, files


def installed_version(fleet: Fleet, h: Host) -> str:
    """The shoal version in h's venv (-I: not the repo's egg-info from the cwd)."""
    python = fleet.sysroot(h) / "opt" / "venv" / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('shoal'))"
    return _run([str(python), "-I", "-c", code]).stdout.strip()


def agent_pid(fleet: Fleet, h: Host) -> int:
    return int((fleet.sysroot(h) / "run" / "shoal-agent.pid").read_text())


@pytest.mark.netns
def test_playbooks_form_grow_shrink_and_upgrade_a_cluster(fleet: Fleet) -> None:
    """site.yml on three bare hosts forms a 3-manager cluster that runs a service; a re-run
    changes nothing, nor does `--check --diff`; hosts added to the inventory (and only they)
    join on the next run; swapping a manager and a worker in the inventory is shown by
    `--check` and done (promotion first) by the next run, tasks running on; remove.yml drains
    a node (its task moves) and takes it out of `node ls`; upgrade.yml with the installed
    version changes nothing, and with a newer wheel upgrades 3 managers and 2 workers host by
    host under a continuous write load: every agent restarts, no task is restarted or
    orphaned, the cluster keeps accepting writes around every restart, and `node ls` shows
    the new version on every node (issue 18)."""
    h1, h2, h3, h4, h5, h6 = fleet.targets
    managers = [h1, h2, h3]
    t0 = time.monotonic()
    wheel, newer = fleet.build_wheels()
    fleet.write_inventory(wheel, managers=managers, workers=[])
    timings = {"wheels": time.monotonic() - t0}

    # 1. First run: the cluster forms, every node is ready, a service runs on all of them.
    t = time.monotonic()
    first = ok(fleet.playbook("site.yml"))
    timings["first run"] = time.monotonic() - t
    assert all(first.changed(h.name) > 0 for h in managers), first.recap
    nodes = nodes_by_host(h1)
    assert sorted(nodes) == ["h1", "h2", "h3"], nodes
    assert all(n["state"] == "ready" and n["role"] == "manager" for n in nodes.values()), nodes
    assert [n["manager_status"] for n in nodes.values()].count("leader") == 1, nodes
    wait_until(lambda: "10.96." in json.dumps(json.loads(h2.cli("info").stdout)["network"]),
               timeout=15, what=f"h2's task subnet inside {CLUSTER_CIDR}")
    for h in managers:  # the unit is always rendered (and the role verified it)
        unit = (fleet.sysroot(h) / "systemd" / "shoal-agent.service").read_text()
        assert "KillMode=process" in unit and "Restart=on-failure" in unit
    h1.cli("service", "create", "--name", "web", "--replicas", "3", "--stop-grace-period", "2",
           "--", "sleep", "100000")
    tasks = wait_running(h1, "web", 3)
    assert sorted(t["node"] for t in tasks) == ["h1", "h2", "h3"], tasks

    # 2. Second run: nothing changes; --check --diff runs its read-only commands and agrees.
    t = time.monotonic()
    second = ok(fleet.playbook("site.yml"))
    timings["second run"] = time.monotonic() - t
    assert {h: r["changed"] for h, r in second.recap.items()} == \
        {"h1": 0, "h2": 0, "h3": 0}, second.changed_tasks()
    t = time.monotonic()
    check = ok(fleet.playbook("site.yml", "--check", "--diff"))
    timings["check"] = time.monotonic() - t
    assert {h: r["changed"] for h, r in check.recap.items()} == \
        {"h1": 0, "h2": 0, "h3": 0}, check.changed_tasks()

    # 3. Hosts added to the inventory join (as workers) on the next run; nobody else changes.
    fleet.write_inventory(wheel, managers=managers, workers=[h4, h5, h6])
    t = time.monotonic()
    third = ok(fleet.playbook("site.yml"))
    timings["add hosts"] = time.monotonic() - t
    assert all(third.changed(h.name) > 0 for h in (h4, h5, h6)), third.recap
    assert all(third.changed(h.name) == 0 for h in managers), third.changed_tasks()
    nodes = nodes_by_host(h2)
    assert sorted(nodes) == ["h1", "h2", "h3", "h4", "h5", "h6"], nodes
    assert all(nodes[h]["role"] == "worker" and nodes[h]["state"] == "ready"
               for h in ("h4", "h5", "h6")), nodes
    h1.cli("service", "scale", "web=6")
    tasks = wait_running(h1, "web", 6)
    task_pids = {t["id"]: t["pid"] for t in tasks}
    (on_h3,) = [t for t in tasks if t["node"] == "h3"]

    # 4. h4 moves to the managers and h3 to the workers: --check shows both changes and makes
    #    neither; the real run promotes h4, then demotes h3; tasks keep running.
    fleet.write_inventory(wheel, managers=[h1, h2, h4], workers=[h3, h5, h6])
    check = ok(fleet.playbook("site.yml", "--check", "--diff"))
    assert "promote h4" in check.output and "demote h3" in check.output, check.output[-3000:]
    assert sum(r["changed"] for r in check.recap.values()) > 0, check.recap
    roles_before = {"h1": "manager", "h2": "manager", "h3": "manager", "h4": "worker",
                    "h5": "worker", "h6": "worker"}
    assert {n: x["role"] for n, x in nodes_by_host(h1).items()} == roles_before
    t = time.monotonic()
    swap = ok(fleet.playbook("site.yml"))
    timings["swap roles"] = time.monotonic() - t
    assert swap.output.index("h4 to manager") < swap.output.index("h3 to worker"), \
        "promotion first"
    nodes = nodes_by_host(h1)
    assert {n: x["role"] for n, x in nodes.items()} == \
        {**roles_before, "h3": "worker", "h4": "manager"}, nodes
    assert all(n["state"] == "ready" for n in nodes.values()), nodes
    assert json.loads(h4.cli("info").stdout)["role"] == "manager"
    assert json.loads(h3.cli("info").stdout)["role"] == "worker"
    assert {t["id"]: t["pid"] for t in wait_running(h1, "web", 6)} == task_pids
    again = ok(fleet.playbook("site.yml", "--check", "--diff"))
    assert sum(r["changed"] for r in again.recap.values()) == 0, again.changed_tasks()

    # 5. remove.yml: h3 (now a worker) is drained (its task stops and runs elsewhere), leaves
    #    `node ls`, and its agent is stopped.
    managers, workers = [h1, h2, h4], [h5, h6]
    hosts = managers + workers
    t = time.monotonic()
    removed = ok(fleet.playbook("remove.yml", "-e", "shoal_remove_hosts=h3"))
    timings["remove"] = time.monotonic() - t
    assert removed.changed("h3") > 0, removed.recap
    assert sorted(nodes_by_host(h1)) == ["h1", "h2", "h4", "h5", "h6"]
    tasks = wait_running(h1, "web", 6)
    assert {t["node"] for t in tasks} == {"h1", "h2", "h4", "h5", "h6"}, tasks
    wait_until(lambda: not pid_alive(on_h3["pid"]), timeout=15,
               what=f"h3's task (pid {on_h3['pid']}) to stop")
    assert not (fleet.sysroot(h3) / "run" / "shoal-agent.pid").exists(), \
        "remove.yml should stop h3's agent"

    # 6. upgrade.yml with the version already installed: nothing to do, said so.
    fleet.write_inventory(wheel, managers=managers, workers=workers)
    before = {h.name: agent_pid(fleet, h) for h in hosts}
    same = ok(fleet.playbook("upgrade.yml", "-e", "shoal_upgrade_batch=2"))
    assert all(same.changed(h.name) == 0 for h in hosts), same.changed_tasks()
    assert "is already installed" in same.output
    assert {h.name: agent_pid(fleet, h) for h in hosts} == before

    # 7. upgrade.yml with a newer wheel (issue 18, must show 1) while a 5-replica service
    #    runs (one task per node) and a client writes to the cluster 20 times a second: one
    #    manager at a time, then the two workers together (shoal_upgrade_batch=2), get the
    #    new version and a new agent process; the tasks keep running (same pids, none
    #    orphaned) on every host, managers included; the cluster accepts writes around every
    #    restart; every node is ready again; `shoal --version`, `shoal info` and `node ls`
    #    say the new version.
    h1.cli("service", "create", "--name", "five", "--replicas", "5", "--stop-grace-period",
           "2", "--", "sleep", "100000")
    five = wait_running(h1, "five", 5)
    assert sorted(t["node"] for t in five) == sorted(h.name for h in hosts), five
    fleet.write_inventory(newer, managers=managers, workers=workers)
    task_pids = {t["id"]: t["pid"] for t in tasks + five}
    # 20 writes/s: back to back (~130/s) the load took CPU from the playbook it watches
    load = WriteLoad([(h.name, h.sock) for h in managers], node=h5.name, interval=0.05)
    t = time.monotonic()
    with RestartWatch(before) as watch, load:
        wait_until(lambda: len(load.acked) >= 10, timeout=30, what="the write load running")
        upgraded = ok(fleet.playbook("upgrade.yml", "-e", "shoal_upgrade_batch=2",
                                     timeout=2 * PLAYBOOK_TIMEOUT))
        acked = len(load.acked)
        wait_until(lambda: len(load.acked) >= acked + 10, timeout=30,
                   what="writes accepted after the upgrade")
    timings["upgrade under load"] = time.monotonic() - t
    report = windows(load, watch.exited)
    for w in report:
        gap = f"{w.longest.length:.2f} s" if w.longest else "none"
        role = "manager" if w.host in {h.name for h in managers} else "worker"
        print(f"write load around {w.host}'s restart ({role}): longest interval without an "
              f"acknowledged write {gap}; {w.writes_ok} writes ok, {w.writes_failed} failed")
    failed = [w for w in load.writes if not w.ok]
    for f in failed:
        print(f"  write to {f.manager} failed after {f.ended - f.started:.2f} s: {f.outcome} "
              f"{f.error}")
    assert all(upgraded.changed(h.name) > 0 for h in hosts), upgraded.recap
    old_version, new_version = (w.name.split("-")[1] for w in (wheel, newer))
    for h in hosts:
        assert installed_version(fleet, h) == new_version != old_version
        assert agent_pid(fleet, h) != before[h.name], f"{h.name}'s agent was not restarted"
        assert json.loads(h.cli("info").stdout)["version"] == new_version
        cli = fleet.sysroot(h) / "opt" / "venv" / "bin" / "shoal"
        assert _run([str(cli), "--version"]).stdout.strip() == f"shoal {new_version}"

    def all_new() -> dict[str, dict[str, Any]] | None:
        nodes = nodes_by_host(h4)
        return nodes if all(n["state"] == "ready" and n["version"] == new_version
                            for n in nodes.values()) else None

    nodes = wait_until(all_new, timeout=15, what=f"`node ls`: every node ready, {new_version}")
    assert sorted(nodes) == sorted(h.name for h in hosts), nodes
    orphaned = [t for s in ("web", "five") for t in h1.cli_json("service", "ps", s)
                if t["state"] == "orphaned"]
    # (if some were: which node went down and why — the restart grace ran out, or the
    # leader never learned of the planned restart — and when each agent started again)
    assert orphaned == [], (orphaned, [h1.cli_json("node", "inspect", n)
                                       for n in {t["node"] for t in orphaned}],
                            {h.name: h.log_tail() for h in hosts})
    running = {t["id"]: t["pid"] for s, n in (("web", 6), ("five", 5))
               for t in wait_running(h1, s, n)}
    assert running == task_pids, "upgrade restarted tasks"

    # The write load, per restart (agents exit in the playbook's order: one manager at a
    # time, then both workers together).
    assert list(watch.exited)[:3] == [h.name for h in managers], watch.exited
    assert sorted(watch.exited) == sorted(h.name for h in hosts), watch.exited
    assert all(w.writes_ok > 0 for w in report if w.host in {h.name for h in managers}), report
    # What keeps each manager's write gap short (docs/benchmarks.md has the figures): a
    # stopping manager refuses changes at once (503) and then closes its socket, so the client
    # moves on to another manager at once; a leader hands its leadership over before it stops.
    # So no write was cut off by a manager going away under it, none waited for an answer
    # until the client gave up or for Raft's write deadline, and no leader stopped without
    # handing over.
    stuck = [w for w in failed if w.outcome in (CUT, TIMEOUT) or "did not commit" in w.error]
    assert stuck == [], stuck
    for h in managers:
        assert "still the leader" not in h.agent_log.read_text(), h.log_tail()
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def test_ansible_lint_passes(tmp_path: Path) -> None:
    """The role and playbooks pass ansible-lint's `production` profile with no exceptions
    (ansible/.ansible-lint)."""
    lint = BIN / "ansible-lint"
    if not lint.exists():
        pytest.fail("needs ansible-lint (pip install -e '.[test]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", LC_ALL="C.UTF-8", NO_COLOR="1",
               ANSIBLE_HOME=str(tmp_path / "ansible"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = subprocess.run([str(lint), "--nocolor"], cwd=ANSIBLE_DIR, env=env, text=True,
                         capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                         check=False)
    assert res.returncode == 0, f"ansible-lint failed:\n{res.stdout}\n{res.stderr}"
