"""The multi-host lab's own mechanics, proven with plain processes (no shoal agent needed).

A fake ``shoal`` executable stands in for the agent and CLI where the Host API around them is
under test (start/kill/restart, socket readiness, log tails, command errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import labstate
import pytest

import netlab
from netlab import CommandError, Host, Lab, LabError, wait_until

LabFactory = Callable[..., Lab]
TESTS_DIR = Path(__file__).resolve().parent

FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).status)\n"
    "except OSError as exc:\n"
    "    print('error', exc); sys.exit(1)\n"
)

# Looks like the real agent from the outside: serves DATA_DIR/shoal.sock; as a CLI it echoes.
FAKE_SHOAL = textwrap.dedent("""\
    import json, os, socket, sys, time
    args = sys.argv[1:]
    if args and args[0] == "agent":
        data_dir = args[args.index("--data-dir") + 1]
        print("fake agent on", socket.gethostname(), "pid", os.getpid(), flush=True)
        if os.environ.get("FAKE_AGENT_FAIL"):
            print("boom: refusing to start", file=sys.stderr, flush=True)
            sys.exit(3)
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(data_dir, "shoal.sock"))
        s.listen()
        while True:
            conn, _ = s.accept()
            conn.close()
    if "--format" in args:
        print(json.dumps({"argv": args, "hostname": socket.gethostname()}))
    elif args[-1:] == ["fail"]:
        print("partial output")
        print("error: it failed", file=sys.stderr)
        sys.exit(2)
    else:
        print(" ".join(args))
""")

def fetch(src: Host, url: str, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    return src.run(sys.executable, "-c", FETCH, url, str(timeout), check=False,
                   timeout=timeout + 10)


def serve_http(host: Host, port: int = 8000) -> subprocess.Popen[bytes]:
    proc = host.spawn(sys.executable, "-m", "http.server", str(port), "--bind", host.ip,
                      log_name="http")
    url = f"http://{host.ip}:{port}/"
    wait_until(lambda: fetch(host, url).returncode == 0, timeout=15, what=f"http server on {url}")
    return proc


def start_fake_task(host: Host, task_id: str) -> Path:
    """Mimic the runtime: a setsid'd shim (its cmdline names its task dir) writes shim.pid and
    runs the task in its own pid+net namespace under tini, detached from us."""
    task_dir = host.data_dir / "tasks" / task_id
    task_dir.mkdir(parents=True)
    shim = ('echo $$ > "$0/shim.pid.tmp" && mv "$0/shim.pid.tmp" "$0/shim.pid"; '
            'unshare --fork --pid --mount-proc --net --uts --ipc tini -- sleep 1000; '
            'echo $? > "$0/exit"')
    subprocess.run(["ip", "netns", "exec", host.netns, "setsid", "-f", "sh", "-c", shim,
                    str(task_dir)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    pidfile = task_dir / "shim.pid"
    wait_until(pidfile.exists, timeout=10, what=f"{pidfile}")
    shim_pid = int(pidfile.read_text().split()[0])
    wait_until(lambda: any(p.comm == "sleep" for p in descendants(shim_pid)), timeout=10,
               what="the fake task's sleep")
    return task_dir


def descendants(pid: int) -> list[netlab.ProcInfo]:
    procs = netlab._all_procs()
    out: list[netlab.ProcInfo] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for info in procs.values():
            if info.ppid == parent:
                out.append(info)
                todo.append(info.pid)
    return out


def our_netns(runid: str) -> list[str]:
    return [ns for ns in netlab.list_netns() if ns.startswith(f"shoal-lab-{runid}-")]


# -------------------------------------------------------------------------------------------


@pytest.mark.netns
def test_hosts_reach_each_other_over_the_bridge(lab_factory: LabFactory) -> None:
    lab = lab_factory(3)
    h1, h2, h3 = lab.hosts
    assert [h.ip for h in lab.hosts] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert [h.name for h in lab.hosts] == ["h1", "h2", "h3"]
    server = serve_http(h2)
    for src in (h1, h3):
        res = fetch(src, f"http://{h2.ip}:8000/")
        assert res.returncode == 0 and res.stdout.strip() == "200", res
    assert server.pid in h2.pids(), "the http server runs in h2's netns"
    assert not h1.pids(), "nothing runs in h1's netns"


@pytest.mark.netns
def test_point_to_point_hosts_reach_each_other_through_one_neighbour(
        lab_factory: LabFactory, fake_shoal: Path) -> None:
    """The lighter mode (bench/scale_lab.py): no shared L2, each host's only ARP neighbour is
    the switch however many peers it talks to (the kernel's ARP table is machine-wide); a
    cut link still isolates a host; start_agents starts several agents at once."""
    lab = lab_factory(3, point_to_point=True, shoal=fake_shoal)
    h1, h2, h3 = lab.hosts
    serve_http(h2)
    serve_http(h3)
    for dst in (h2, h3):
        res = fetch(h1, f"http://{dst.ip}:8000/")
        assert res.returncode == 0 and res.stdout.strip() == "200", res
    neigh = subprocess.run(["ip", "-n", h1.netns, "-4", "neigh"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert neigh[0] == "10.77.0.1" and h2.ip not in neigh and h3.ip not in neigh, neigh
    h3.cut_link()
    assert fetch(h1, f"http://{h3.ip}:8000/", timeout=1.0).returncode != 0
    lab.start_agents([h1, h2], batch=2)
    assert h1.agent_alive() and h2.agent_alive() and not h3.agent_alive()


@pytest.mark.netns
def test_the_root_namespace_has_no_lab_address(lab_factory: LabFactory) -> None:
    lab = lab_factory(2)
    root_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                                check=True).stdout
    assert "10.77.0." not in root_addrs
    assert not [ln for ln in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                            check=True).stdout.splitlines()
                if f"sl{lab.runid}" in ln], "no lab interface in the root netns"
    sw_addrs = subprocess.run(["ip", "-n", lab.switch_netns, "-o", "addr"], capture_output=True,
                              text=True, check=True).stdout
    assert "10.77.0." not in sw_addrs, "the switch has no address on the lab subnet"


@pytest.mark.netns
def test_cut_link_isolates_a_host_and_restore_link_brings_it_back(
        lab_factory: LabFactory) -> None:
    lab = lab_factory(2)
    h1, h2 = lab.hosts
    serve_http(h2)
    url = f"http://{h2.ip}:8000/"
    h2.cut_link()
    res = fetch(h1, url, timeout=1.0)
    assert res.returncode != 0, res
    assert fetch(h2, url).returncode == 0, "the cut host still reaches itself"
    h2.restore_link()
    wait_until(lambda: fetch(h1, url).returncode == 0, timeout=15, what="h2 reachable again")


@pytest.mark.netns
def test_run_errors_show_command_rc_and_output(lab_factory: LabFactory) -> None:
    (h1,) = lab_factory(1).hosts
    with pytest.raises(CommandError) as info:
        h1.run("sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    err = info.value
    assert err.rc == 3 and "to-out" in err.stdout and "to-err" in err.stderr
    assert "exited 3" in str(err) and "echo to-out" in str(err) and "to-err" in str(err)
    with pytest.raises(CommandError, match="timed out"):
        h1.run("sleep", "30", timeout=0.5)
    assert h1.run("sh", "-c", "exit 4", check=False).returncode == 4


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the answer; last value: 0"):
        wait_until(lambda: 0, timeout=0.05, what="the answer")


def test_wait_until_returns_the_truthy_value_and_retries_exceptions() -> None:
    calls: list[int] = []

    def pred() -> int | None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")
        return 42

    assert wait_until(pred, timeout=5, interval=0.01, what="pred") == 42
    with pytest.raises(AssertionError, match="RuntimeError"):
        wait_until(lambda: (_ for _ in ()).throw(RuntimeError("nope")), timeout=0.05,
                   interval=0.01)


@pytest.fixture
def fake_shoal(tmp_path: Path) -> Path:
    exe = tmp_path / "shoal"
    exe.write_text(f"#!{sys.executable}\n{FAKE_SHOAL}")
    exe.chmod(0o755)
    return exe


@pytest.mark.netns
def test_agent_start_kill_restart_and_cli(lab_factory: LabFactory, fake_shoal: Path) -> None:
    lab = lab_factory(2, shoal=fake_shoal)
    h1, h2 = lab.hosts
    h1.start_agent()
    assert h1.agent_alive() and h1.agent_pid in h1.pids()
    assert f"fake agent on {h1.name}" in h1.agent_log.read_text(), "own hostname per host"
    with pytest.raises(LabError, match="already running"):
        h1.start_agent()
    res = h1.cli("node", "ls")
    assert res.stdout.strip() == f"-H unix://{h1.sock} node ls"
    assert h1.cli_json("node", "ls") == {
        "argv": ["-H", f"unix://{h1.sock}", "node", "ls", "--format", "json"],
        "hostname": os.uname().nodename}
    with pytest.raises(CommandError) as info:
        h1.cli("fail")
    assert info.value.rc == 2 and "partial output" in str(info.value)
    assert "error: it failed" in str(info.value)

    old = h1.agent_pid
    assert h1.kill_agent() == -signal.SIGKILL
    assert not h1.agent_alive() and old not in h1.pids()
    h1.restart_agent()
    assert h1.agent_alive() and h1.agent_pid != old
    assert h1.kill_agent(signal.SIGTERM) == -signal.SIGTERM
    assert not h2.agent_alive() and h2.kill_agent() is None


@pytest.mark.netns
def test_agent_start_failure_shows_the_log_tail(lab_factory: LabFactory, fake_shoal: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (h1,) = lab_factory(1, shoal=fake_shoal).hosts
    monkeypatch.setenv("FAKE_AGENT_FAIL", "1")
    with pytest.raises(LabError, match=r"(?s)agent exited with 3.*boom: refusing to start"):
        h1.start_agent(timeout=10)
    assert not h1.agent_alive()


@pytest.mark.netns
def test_close_leaves_nothing_behind(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    h1, h2 = lab.hosts
    serve_http(h2)
    h1.spawn("sleep", "1000")
    # A task: the shim runs in h1's netns, the task in its own netns + pid namespace (so
    # `ip netns pids` misses it; its parent chain, session and shim.pid do not).
    task_dir = start_fake_task(h1, "t0123456789abcdef")
    shim_pid = int((task_dir / "shim.pid").read_text())
    task_procs = descendants(shim_pid)
    task_pids = [shim_pid, *(p.pid for p in task_procs)]
    sleeps = [p.pid for p in task_procs if p.comm == "sleep"]
    assert sleeps and not set(sleeps) & set(h1.pids()), "the task is not in h1's netns"
    # A stray process outside every lab netns whose cmdline points into a data dir, plus its
    # child (caught by session/parent closure).
    stray_dir = h2.data_dir / "stray"
    stray_dir.mkdir()
    subprocess.run(["setsid", "-f", "sh", "-c", "sleep 1000; true", str(stray_dir)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    stray = wait_until(
        lambda: [pid for pid, why in netlab._lab_targets(lab._state).items()
                 if why == "cmdline mentions the lab dir" and pid not in h2.pids()],
        timeout=5, what="the stray process")
    stray_pids = stray + [p.pid for pid in stray for p in descendants(pid)]
    # A mount below a data dir (in the root mount namespace).
    mnt = h1.data_dir / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "shoal-lab-test", str(mnt)], check=True)
    netns_pids = h1.pids() + h2.pids()
    # A cgroup named after the task (as a runtime would make one).
    cg_base = next(b for b in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/pids"),
                               Path("/sys/fs/cgroup")) if (b / "cgroup.procs").exists())
    cgroup = cg_base / f"shoal-test-{task_dir.name}"
    cgroup.mkdir()

    before = lab.leftovers()
    assert f"cgroup {cgroup}" in before, before
    assert any(item.startswith(f"mount {mnt}") for item in before), before
    assert any(item.startswith(f"process {sleeps[0]} ") for item in before), before
    assert netlab._task_shims(lab._state) == [shim_pid]
    assert sum(item.startswith("netns ") for item in before) == 3

    assert lab.close() == []
    assert lab.leftovers() == []
    assert our_netns(lab.runid) == []
    for pid in task_pids + stray_pids + netns_pids:
        assert not netlab._alive(pid), f"pid {pid} survived close()"
    assert not lab.root.exists()
    assert not cgroup.exists()
    assert not (netlab.STATE_DIR / f"{lab.runid}.json").exists()
    assert lab.close() == [], "close() is idempotent"


CHILD = textwrap.dedent("""\
    import json, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import netlab
    lab = netlab.Lab(2)
    sleeper = lab.hosts[1].spawn("sleep", "1000")
    task = lab.hosts[0].data_dir / "tasks" / "t00000000000001"
    task.mkdir(parents=True)
    subprocess.run(["ip", "netns", "exec", lab.hosts[0].netns, "setsid", "-f", "sh", "-c",
                    'echo $$ > "$0/shim.pid"; exec unshare --fork --pid --net tini -- sleep 1000',
                    str(task)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(json.dumps({"runid": lab.runid, "root": str(lab.root), "sleeper": sleeper.pid,
                      "task_dir": str(task)}), flush=True)
    sys.stdin.readline()
    print(json.dumps(lab.close()), flush=True)
""")


def start_child_lab() -> tuple[subprocess.Popen[str], dict[str, object]]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS_DIR)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        pytest.fail(f"child lab failed to start (rc {child.returncode})")
    info: dict[str, object] = json.loads(line)
    return child, info


@pytest.mark.netns
def test_sweep_removes_a_crashed_lab_and_spares_a_live_one() -> None:
    crashed, dead = start_child_lab()
    live, alive = start_child_lab()
    try:
        dead_rid, live_rid = str(dead["runid"]), str(alive["runid"])
        pidfile = Path(str(dead["task_dir"])) / "shim.pid"
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10,
                   what="the crashed lab's task shim")
        shim = int(pidfile.read_text())
        wait_until(lambda: descendants(shim), timeout=10, what="the task's processes")
        dead_pids = [int(str(dead["sleeper"])), shim, *(p.pid for p in descendants(shim))]
        crashed.kill()  # SIGKILL: no finally, no close()
        crashed.wait(timeout=10)
        assert len(our_netns(dead_rid)) == 3, "the crash left the namespaces behind"
        assert all(netlab._alive(p) for p in dead_pids), "and the processes"

        removed = netlab.sweep()

        assert any(item.startswith(f"lab {dead_rid}:") for item in removed), removed
        assert not any(live_rid in item for item in removed), removed
        assert our_netns(dead_rid) == []
        for pid in dead_pids:
            assert not netlab._alive(pid), f"crashed lab's pid {pid} survived the sweep"
        assert not Path(str(dead["root"])).exists()
        assert not (netlab.STATE_DIR / f"{dead_rid}.json").exists()
        # The live lab is untouched.
        assert len(our_netns(live_rid)) == 3
        assert netlab._alive(int(str(alive["sleeper"])))
        assert Path(str(alive["root"])).is_dir()
        assert (netlab.STATE_DIR / f"{live_rid}.json").exists()
    finally:
        assert live.stdin is not None and live.stdout is not None
        live.stdin.write("\n")
        live.stdin.flush()
        out = live.stdout.readline()
        live.stdin.close()
        live.stdout.close()
        live.wait(timeout=30)
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
        assert crashed.stdout is not None and crashed.stdin is not None
        crashed.stdout.close()
        crashed.stdin.close()
        netlab.sweep()
    assert json.loads(out) == [], "the live lab closed cleanly by itself"
    assert our_netns(live_rid) == []
    assert not netlab._alive(int(str(alive["sleeper"])))


@pytest.mark.netns
def test_sweep_reports_a_process_that_survives_instead_of_counting_it_removed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep checks that the processes it killed are gone: one that is still running is
    reported as "could not remove" and the state file stays for the next sweep (a real sweep
    once said "removed" for 105 agents that went on running)."""
    crashed, dead = start_child_lab()
    try:
        rid, sleeper = str(dead["runid"]), int(str(dead["sleeper"]))
        crashed.kill()
        crashed.wait(timeout=10)
        group = os.getpgid(sleeper)
        real_kill, real_killpg = os.kill, os.killpg
        # The kills of one process do not take effect (as for a process the kernel does not
        # let go of); every other kill is real.
        monkeypatch.setattr(os, "kill",
                            lambda pid, sig: None if pid == sleeper else real_kill(pid, sig))
        monkeypatch.setattr(os, "killpg",
                            lambda pg, sig: None if pg == group else real_killpg(pg, sig))
        # (the sweep kills until KILL_TIMEOUT runs out: 10 s waited out for nothing here)
        monkeypatch.setattr(labstate, "KILL_TIMEOUT", 1.0)

        removed = netlab.sweep()

        assert netlab._alive(sleeper)
        assert any(item.startswith(f"lab {rid}: could not remove: process {sleeper} ")
                   for item in removed), removed
        assert not any(item.startswith(f"lab {rid}: process {sleeper} ") for item in removed)
        assert (netlab.STATE_DIR / f"{rid}.json").exists(), "kept for the next sweep"

        monkeypatch.undo()
        again = netlab.sweep()
        assert any(item.startswith(f"lab {rid}: process {sleeper} ") for item in again), again
        assert not netlab._alive(sleeper)
        assert not (netlab.STATE_DIR / f"{rid}.json").exists()
    finally:
        monkeypatch.undo()
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
        assert crashed.stdout is not None and crashed.stdin is not None
        crashed.stdout.close()
        crashed.stdin.close()
        netlab.sweep()


@pytest.mark.netns
def test_sweep_removes_orphan_namespaces_without_state_file() -> None:
    rid = secrets.token_hex(3)
    while (netlab.STATE_DIR / f"{rid}.json").exists() or our_netns(rid):
        rid = secrets.token_hex(3)
    ns = f"shoal-lab-{rid}-h1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "setsid", "-f", "sleep", "1000"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        pids = wait_until(lambda: netlab.netns_pids(ns), timeout=5, what="sleep in orphan netns")
        removed = netlab.sweep()
        assert f"orphan netns {ns}" in removed
        assert ns not in netlab.list_netns()
        deadline = time.monotonic() + 5
        while any(netlab._alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(netlab._alive(p) for p in pids)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -------------------------------------------------------------------------------------------
# The demo's own control flow, against a fake cluster (the real agent is tested elsewhere).

FAKE_CLUSTER = textwrap.dedent("""\
    import json, os, socket, sys, time
    args = sys.argv[1:]
    if args[0] == "agent":
        data_dir = args[args.index("--data-dir") + 1]
        addr = args[args.index("--advertise-addr") + 1]
        with open(os.path.join(data_dir, "fake-agent.json"), "w") as fh:
            json.dump({"pid": os.getpid(), "addr": addr, "hostname": socket.gethostname()}, fh)
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(data_dir, "shoal.sock"))
        s.listen()
        while True:
            s.accept()[0].close()
    assert args[0] == "-H"
    data_dir = os.path.dirname(args[1][len("unix://"):])
    args = args[2:]
    fmt_json = "--format" in args
    args = [a for a in args if a not in ("--format", "json", "-d")]
    path = os.path.join(os.path.dirname(data_dir), "fake-cluster.json")
    state = json.load(open(path)) if os.path.exists(path) else {"nodes": [], "replicas": 0}
    me = json.load(open(os.path.join(data_dir, "fake-agent.json")))

    def alive(node):
        agent = json.load(open(os.path.join(node["dir"], "fake-agent.json")))
        try:
            stat = open(f"/proc/{agent['pid']}/stat").read()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def save():
        with open(path + ".tmp", "w") as fh:
            json.dump(state, fh)
        os.replace(path + ".tmp", path)

    def node_list():
        up = [n for n in state["nodes"] if alive(n)]
        leader = next((n for n in up if n["role"] == "manager"), None)
        return [{"id": n["id"], "hostname": n["hostname"], "addr": n["addr"] + ":2377",
                 "role": n["role"], "state": "ready" if n in up else "down",
                 "availability": "active",
                 "manager_status": ("leader" if n is leader else
                                    "reachable" if n in up else "unreachable")}
                for n in state["nodes"]], up

    def emit(rows, cols):
        if fmt_json:
            print(json.dumps(rows))
        else:
            print("  ".join(c.upper() for c in cols))
            for r in rows:
                print("  ".join(str(r[c]) for c in cols))

    def join(role):
        state["nodes"].append({"id": "node-" + me["hostname"], "hostname": me["hostname"],
                               "addr": me["addr"], "role": role, "dir": data_dir})
        save()

    cmd = args[:2]
    if args[0] == "init":
        join("manager")
        print("Swarm initialized: current node is now a manager.")
    elif args[0] == "join-token":
        print("SWMTKN-fake-" + args[1])
    elif args[0] == "join":
        join("manager" if "manager" in args[args.index("--token") + 1] else "worker")
        print("This node joined a cluster.")
    elif cmd == ["node", "ls"]:
        emit(node_list()[0], ["id", "hostname", "state", "manager_status"])
    elif cmd == ["service", "create"]:
        if os.environ.get("FAKE_FAIL_CREATE"):
            print("error: no suitable node", file=sys.stderr)
            sys.exit(1)
        state["replicas"] = int(args[args.index("--replicas") + 1])
        save()
        print("web")
    elif cmd == ["service", "scale"]:
        if os.environ.get("FAKE_HANG_SCALE"):
            time.sleep(120)
        state["replicas"] = int(args[2].split("=")[1])
        save()
        print(args[2])
    elif cmd == ["service", "update"]:
        if "--env-add" in args:  # a task-template change: new tasks (ids)
            state["generation"] = state.get("generation", 0) + 1
            save()
        print(args[-1])
    elif cmd == ["service", "inspect"]:
        print(json.dumps([{"name": args[2], "update_status": {"state": "completed"}}]))
    elif cmd == ["service", "ps"]:
        up = node_list()[1]
        gen = state.get("generation", 0)
        rows = [{"id": f"t{gen}-{i}", "name": f"web.{i}", "service": "web", "slot": i,
                 "node_id": up[(i - 1) % len(up)]["id"],
                 "node": up[(i - 1) % len(up)]["hostname"], "desired_state": "running",
                 "state": "running", "message": "", "exit_code": None, "pid": 0}
                for i in range(1, state["replicas"] + 1)]
        emit(rows, ["name", "node", "state"])
    elif args[0] == "exec":  # (the demo's `exec TASK sh -c 'echo ...'`)
        print("hello from web-" + args[1].split(".")[-1])
    else:
        print("fake shoal: unknown command", args, file=sys.stderr)
        sys.exit(2)
""")

DEMO = TESTS_DIR.parent / "demo" / "demo.py"


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Path:
    exe = tmp_path / "shoal"
    exe.write_text(f"#!{sys.executable}\n{FAKE_CLUSTER}")
    exe.chmod(0o755)
    return exe


def start_demo(fake: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(DEMO), "--timeout", "20"], text=True,
                            env={**os.environ, "SHOAL_BIN": str(fake), **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def demo_runid(stdout: str) -> str:
    m = re.search(r"in netns shoal-lab-([0-9a-f]{6})-h1", stdout)
    assert m, stdout
    return m.group(1)


def assert_demo_left_nothing(runid: str) -> None:
    assert our_netns(runid) == []
    assert not (netlab.STATE_DIR / f"{runid}.json").exists()
    assert not (netlab.STATE_DIR / f"shoal-lab-{runid}").exists()
    marker = f"SHOAL_LAB={runid}".encode()
    assert not [p for p in netlab._all_procs()
                if marker in netlab._read_bytes(f"/proc/{p}/environ").split(b"\0")]


@pytest.mark.netns
def test_demo_narrates_the_failover_against_a_fake_cluster(fake_cluster: Path) -> None:
    demo = start_demo(fake_cluster)
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, f"{out}\n{err}"
    for line in ("Killing the leader's agent (h1) with SIGKILL...",
                 "new leader: h2", "service healed", "nothing left behind"):
        assert line in out, out
    assert_demo_left_nothing(demo_runid(out))


@pytest.mark.netns
def test_demo_failure_names_the_step_and_cleans_up(fake_cluster: Path) -> None:
    demo = start_demo(fake_cluster, FAKE_FAIL_CREATE="1")
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 1, f"{out}\n{err}"
    assert "demo FAILED: creating the service: command exited 1" in err
    assert "error: no suitable node" in err
    assert "nothing left behind" in out
    assert_demo_left_nothing(demo_runid(out))


@pytest.mark.netns
def test_form_cluster_inits_joins_and_waits_for_ready(lab_factory: LabFactory,
                                                      fake_cluster: Path) -> None:
    lab = lab_factory(4, shoal=fake_cluster)
    nodes = lab.form_cluster(managers=2, workers=1, timeout=20)
    assert [(n["hostname"], n["role"], n["state"]) for n in nodes] == [
        ("h1", "manager", "ready"), ("h2", "manager", "ready"), ("h3", "worker", "ready")]
    assert lab.host(nodes[2]["addr"]) is lab.hosts[2]
    assert not lab.hosts[3].agent_alive(), "only the cluster's hosts run an agent"
    with pytest.raises(LabError, match="cannot form"):
        lab.form_cluster(managers=3, workers=2)


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_cleans_up_when_interrupted(fake_cluster: Path, sig: signal.Signals) -> None:
    demo = start_demo(fake_cluster, FAKE_HANG_SCALE="1")
    assert demo.stdout is not None
    lines: list[str] = []
    for line in demo.stdout:  # read up to the step that hangs in the fake
        lines.append(line)
        if line.startswith("==> Scaling"):
            break
    time.sleep(0.5)  # let it enter the hanging `service scale`
    demo.send_signal(sig)
    out, err = demo.communicate(timeout=60)
    out = "".join(lines) + out
    assert demo.returncode == 128 + sig, f"{out}\n{err}"
    assert f"interrupted by {sig.name}" in err
    assert "nothing left behind" in out
    assert_demo_left_nothing(demo_runid(out))


@pytest.mark.netns
def test_empty_runtime_parent_cgroups_are_removed_and_busy_ones_kept() -> None:
    """What an agent leaves when its last task went: an empty /sys/fs/cgroup/*/shoal. It is
    removed at the end of a lab and of a test session; one still holding a group stays."""
    base = next(b for b in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/pids"),
                            Path("/sys/fs/cgroup")) if (b / "cgroup.procs").exists())
    # (a parent of its own name: the real "shoal" may hold another test's group right now)
    name = f"shoal-test-parent-{secrets.token_hex(4)}"
    parent = base / name
    parent.mkdir()
    child = parent / "shoal-test-task"
    child.mkdir()
    try:
        assert parent not in netlab.remove_empty_cgroup_parents(name)
        assert parent.is_dir(), "a parent with a group in it is kept"
        child.rmdir()
        assert parent in netlab.remove_empty_cgroup_parents(name)
        assert not parent.exists()
    finally:
        for d in (child, parent):
            with contextlib.suppress(OSError):
                d.rmdir()
