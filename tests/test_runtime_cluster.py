"""Tasks as real containers, end to end on netns hosts through the CLI (issue 3 must-shows):
isolation, limits, images moved between peers, restart policy, adoption, merged logs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runtime_images import busybox_rootfs, docker_save

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns


def tasks(h: Host, svc: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = h.cli_json("service", "ps", svc)
    return out


def running(h: Host, svc: str, n: int, timeout: float = 40) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        r = [t for t in tasks(h, svc) if t["state"] == "running"
             and t["desired_state"] == "running"]
        return r if len(r) == n else None
    return wait_until(check, timeout=timeout, interval=0.3, what=f"{n} running {svc}")


def logs(h: Host, svc: str) -> str:
    return h.cli("service", "logs", svc).stdout


def logs_with(h: Host, svc: str, needle: str, count: int = 1) -> str | None:
    out = logs(h, svc)
    return out if out.count(needle) >= count else None


def import_busybox(h: Host, tmp_path: Path) -> None:
    """A ~2 MB busybox root filesystem imported on ``h`` as image busybox:1."""
    root = busybox_rootfs(tmp_path / "bb")
    tarball = tmp_path / "busybox.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(root, arcname=".")
    h.cli("image", "import", "busybox:1", str(tarball))


@pytest.fixture
def lab3(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    return lab


def test_isolation_limits_and_restart_policy(lab3: Lab) -> None:
    h1 = lab3.hosts[0]
    probe = ("echo init=$(cat /proc/1/comm) host=$(hostname) procs=$(ls /proc | grep -c "
             "'^[0-9]') user=$(id -u); touch /usr/x 2>/dev/null && echo usr-writable; "
             "mount -o remount,rw /usr 2>/dev/null && echo remounted; echo probe-done; "
             "sleep 100000")
    h1.cli("service", "create", "--name", "probe", "--", "sh", "-c", probe)
    running(h1, "probe", 1)
    out = wait_until(lambda: logs_with(h1, "probe", "probe-done"), timeout=20,
                     what="probe output")
    assert "init=init" in out and "host=probe-1" in out, out
    procs = int(out.split("procs=")[1].split()[0])
    assert procs < 10, out  # init, sh, a subshell, ls, grep: host processes are invisible
    assert "usr-writable" not in out and "remounted" not in out, out

    # per-task usage reaches `service ps`; a CPU spinner limited to 0.2 CPU uses about that
    h1.cli("service", "create", "--name", "spin", "--limit-cpu", "0.2", "--", "python3", "-c",
           "while True: pass")
    running(h1, "spin", 1)

    def cpu() -> float | None:
        u = running(h1, "spin", 1)[0].get("usage") or {}
        return u.get("cpu_seconds")
    c0 = wait_until(cpu, timeout=10, what="usage of spin")
    t0 = time.monotonic()
    time.sleep(3)
    rate = (float(cpu() or 0) - c0) / (time.monotonic() - t0)
    assert 0.03 < rate < 0.35, rate
    assert (running(h1, "probe", 1)[0]["usage"] or {}).get("memory_bytes")

    # memory limit → OOM killed, reported FAILED with the reason; no restart (policy none)
    h1.cli("service", "create", "--name", "hog", "--limit-memory", "32M",
           "--restart-condition", "none", "--", "python3", "-c",
           "b = []\nwhile True: b.append(bytearray(8 << 20))")
    failed = wait_until(lambda: [t for t in tasks(h1, "hog") if t["state"] == "failed"]
                        or None, timeout=40, what="hog failed")
    assert "OOM" in (failed[0]["error"] + failed[0]["message"]), failed
    assert failed[0]["exit_code"] == 137
    time.sleep(2)
    assert len(tasks(h1, "hog")) == 1  # restart condition none: not replaced

    # pids limit caps a fork bomb; the node stays healthy
    bomb = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(1000)\n"
            "        os._exit(0)\n    n += 1\nprint('spawned', n, flush=True)\n"
            "time.sleep(100000)\n")
    h1.cli("service", "create", "--name", "forks", "--limit-pids", "20", "--",
           "python3", "-c", bomb)
    out = wait_until(lambda: logs_with(h1, "forks", "spawned"), timeout=30,
                     what="fork loop done")
    spawned = int(out.split("spawned")[1].split()[0])
    assert spawned < 20, out  # capped by the pids limit, not 200
    assert h1.cli_json("node", "ls")  # the node (and its agent) stay healthy

    # restart policy: on-failure, at most 2 restarts → 3 failed tasks, then it gives up
    h1.cli("service", "create", "--name", "crash", "--restart-condition", "on-failure",
           "--restart-max-attempts", "2", "--restart-delay", "0.2", "--", "sh", "-c", "exit 3")
    wait_until(lambda: len([t for t in tasks(h1, "crash") if t["state"] == "failed"]) == 3,
               timeout=40, what="3 failed attempts")
    time.sleep(2)
    ts = tasks(h1, "crash")
    assert len(ts) == 3 and all(t["exit_code"] == 3 for t in ts), ts

    # stop grace period: a task ignoring SIGTERM is killed after it
    h1.cli("service", "create", "--name", "stubborn", "--stop-grace-period", "1", "--",
           "sh", "-c", "trap '' TERM; sleep 100000 & wait; sleep 100000")
    pid = running(h1, "stubborn", 1)[0]["pid"]
    t0 = time.monotonic()
    h1.cli("service", "rm", "stubborn")
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=20, what="stubborn gone")
    took = time.monotonic() - t0
    assert 0.8 <= took <= 10, took


def test_images_move_between_peers_and_logs_merge(lab3: Lab, tmp_path: Path) -> None:
    h1 = lab3.hosts[0]
    import_busybox(h1, tmp_path)
    assert "busybox:1" in h1.cli("image", "ls").stdout
    # three replicas on three nodes: the two without the image fetch it from h1
    h1.cli("service", "create", "--name", "bb", "--replicas", "3", "--image", "busybox:1",
           "--", "sh", "-c", "echo hello from $(hostname); while true; do echo tick; "
           "sleep 0.5; done")
    ts = running(h1, "bb", 3, timeout=60)
    assert len({t["node"] for t in ts}) == 3
    for h in lab3.hosts[1:]:
        assert "busybox:1" in h.cli("image", "ls").stdout
    out = wait_until(lambda: logs_with(h1, "bb", "hello from", 3), timeout=20,
                     what="3 greetings in merged logs")
    assert {line.split("|")[0].split("@")[1].strip() for line in out.splitlines()
            if "hello" in line} == {"h1", "h2", "h3"}

    # `logs -f` streams new lines from every node
    proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{h1.netns}", "--",
                             str(lab3.shoal), "-H", f"unix://{h1.sock}", "service", "logs",
                             "-f", "--tail", "0", "bb"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while len(seen) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "tick" in line:
                seen.add(line.split("|")[0].split("@")[1].strip())
        assert seen == {"h1", "h2", "h3"}, seen
        # and ends by itself once the service is removed (as docker's)
        h1.cli("service", "rm", "bb")
        proc.communicate(timeout=30)  # (reads what is still in flight; fails if it never ends)
        assert proc.returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it may have ended by itself)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    # a docker-save image with two layers and a config (Entrypoint/Env/WorkingDir)
    save = docker_save(tmp_path)
    h1.cli("image", "load", str(save))
    h1.cli("service", "create", "--name", "saved", "--image", "demo:v1")
    wait_until(lambda: [t for t in tasks(h1, "saved") if t["state"] in
                        ("running", "complete")] or None, timeout=60, what="saved ran")
    # --entrypoint replaces the image's (/bin/sh -c) and drops its Cmd: `/bin/sh -c -c ...`
    # would fail, `/bin/sh -c 'echo ...'` prints
    h1.cli("service", "create", "--name", "ep", "--image", "demo:v1", "--entrypoint",
           "/bin/sh", "--restart-condition", "none", "--", "-c", "echo via-entrypoint")
    (ep,) = h1.cli_json("service", "inspect", "ep")
    assert ep["spec"]["task"]["container"]["entrypoint"] == ["/bin/sh"]
    wait_until(lambda: "via-entrypoint" in h1.cli("service", "logs", "ep").stdout or None,
               timeout=60, what="the entrypoint's output")


def test_security_and_kernel_settings_reach_the_task(lab_factory: Callable[..., Lab],
                                                     tmp_path: Path) -> None:
    """A service's --read-only, --cap-drop/--cap-add, --host, --ulimit and --sysctl, through
    the CLI, the leader and the worker to the task's own namespaces (Docker's flags); and
    Docker's placeholders ({{.Node.Hostname}}…) in the host name, env and mounts."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    import_busybox(h1, tmp_path)
    probe = ("touch /rootfile 2>/dev/null && echo root-writable || echo root-readonly; "
             "touch /scratch/x && echo scratch-writable; "
             "echo somaxconn=$(cat /proc/sys/net/core/somaxconn); "
             "while read k v; do [ \"$k\" = CapEff: ] && echo capeff=$v; done < /proc/self/status; "
             "while read l; do case \"$l\" in 'Max open files'*) echo \"nofile=$l\";; esac; "
             "done < /proc/self/limits; "
             "while read ip name; do [ \"$name\" = db.internal ] && echo hosts=$ip; "
             "[ \"$name\" = host.docker.internal ] && echo gateway=$ip; "
             "done < /etc/hosts; grep -q discovery.type=single-node /proc/1/environ && "
             "echo env-dot; echo probe-done; "
             "sleep 100000")
    h1.cli("service", "create", "--name", "locked", "--image", "busybox:1", "--read-only",
           "--mount", "type=tmpfs,dst=/scratch", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN",
           "--host", "db.internal:10.0.0.2", "--ulimit", "nofile=1000:2000", "--sysctl",
           "net.core.somaxconn=999", "--host", "host.docker.internal:host-gateway",
           "-e", "discovery.type=single-node", "--", "sh", "-c", probe)
    running(h1, "locked", 1, timeout=60)
    out = wait_until(lambda: logs_with(h1, "locked", "probe-done"), timeout=30,
                     what="probe output")
    assert "root-readonly" in out and "scratch-writable" in out, out
    assert "somaxconn=999" in out and "hosts=10.0.0.2" in out, out
    # Docker's host-gateway: the node's address on the task network; an env name with a dot
    gateway = h1.run("ip", "-4", "-o", "addr", "show", "shoal0").stdout.split()[3].split("/")[0]
    assert f"gateway={gateway}" in out and "env-dot" in out, out
    assert int(out.split("capeff=")[1].split()[0], 16) == 1 << 12, out  # CAP_NET_ADMIN alone
    assert out.split("nofile=Max open files")[1].split()[:2] == ["1000", "2000"], out
    host = h1.run("cat", "/proc/sys/net/core/somaxconn").stdout.strip()
    assert host != "999", host  # the node's own is untouched
    # Docker's placeholders, filled in by the node for each task
    h1.cli("volume", "create", "vol-1")
    h1.cli("service", "create", "--name", "tpl", "--label", "env=prod", "--hostname",
           "{{.Node.Hostname}}-{{.Task.Slot}}", "-e", "WHO={{.Service.Name}}.{{.Task.Slot}}",
           "-e", 'ENV={{index .Service.Labels "env"}}', "--mount",
           "type=tmpfs,dst=/data/{{.Task.Slot}}", "--mount",
           "type=volume,src=vol-{{.Task.Slot}},dst=/vol", "--mount",
           "type=volume,src=cache-{{.Node.Hostname}},dst=/cache", "--image", "busybox:1",
           "--user", "app", "--group-add", "root", "--group-add", "4242", "--", "sh", "-c",
           "echo host=$(hostname) who=$WHO env=$ENV dirs=$(ls -d /data/*) groups=$(id -G); "
           "sleep 100000")
    out = wait_until(lambda: logs_with(h1, "tpl", "host="), timeout=30, what="tpl output")
    assert "host=h1-1 who=tpl.1 env=prod dirs=/data/1 groups=" in out, out
    assert set(out.split("groups=")[1].split()) == {"1000", "50", "0", "4242"}, out
    # docker's `service logs --raw`, `--no-task-ids`, `--no-trunc`
    (tid,) = [t["id"] for t in tasks(h1, "tpl")]
    raw = h1.cli("service", "logs", "--raw", "tpl").stdout
    assert raw.startswith("host=h1-1 ") and "|" not in raw, raw
    assert h1.cli("service", "logs", "--no-task-ids", "tpl").stdout.startswith(
        "tpl.1@h1 | host=h1-1 ")
    assert h1.cli("service", "logs", "--no-trunc", "tpl").stdout.startswith(
        f"tpl.1.{tid}@h1 | host=")
    gone = h1.cli("volume", "rm", "vol-1", check=False)  # (vol-{{.Task.Slot}} uses it)
    assert gone.returncode != 0 and "in use" in gone.stderr, gone
    # a volume made implicitly (no `volume create`) is listed as docker's, and in use
    vols = {v["name"]: v for v in h1.cli_json("volume", "ls")}
    assert vols["cache-h1"]["implicit"] and vols["cache-h1"]["nodes"] == ["h1"], vols
    assert "implicit" not in vols["vol-1"] and vols["vol-1"]["services"] == ["tpl"], vols
    gone = h1.cli("volume", "rm", "cache-h1", check=False)
    assert gone.returncode != 0 and "in use by service tpl" in gone.stderr, gone
    # a placeholder that fills in no host name is said as such (the task fails, not the node)
    h1.cli("service", "create", "--name", "badhost", "--label", "x=a_b", "--hostname",
           '{{index .Service.Labels "x"}}', "--restart-condition", "none", "--", "true")
    failed = wait_until(lambda: [t for t in tasks(h1, "badhost") if t["error"]] or None,
                        timeout=30, what="badhost's error")
    assert "is 'a_b' on this node: not a valid host name" in failed[0]["error"], failed
    bad = h1.cli("service", "create", "--name", "badtpl", "-e", "X={{.Node.Bogus}}", "--",
                 "true", check=False)
    assert bad.returncode != 0 and "--env" in bad.stderr and "Node.Bogus" in bad.stderr, bad
    # Docker's --tty (a shell waits on its terminal instead of exiting), --oom-score-adj and
    # --container-label; `service update --tty=false` gives the shell /dev/null again
    h1.cli("service", "create", "--name", "shell", "--image", "busybox:1", "-t",
           "--oom-score-adj", "321", "--container-label", "role=debug", "--", "sh", "-c",
           "echo tty=$(tty) oom=$(cat /proc/self/oom_score_adj); exec sh")
    out = wait_until(lambda: logs_with(h1, "shell", "tty="), timeout=30, what="shell output")
    assert "tty=/dev/pts/0 oom=321" in out, out
    (first,) = running(h1, "shell", 1)
    time.sleep(1.5)  # (a shell reading /dev/null would have exited and been restarted)
    assert [t["id"] for t in running(h1, "shell", 1)] == [first["id"]]
    (shell,) = h1.cli_json("service", "inspect", "shell")
    assert shell["spec"]["task"]["container"]["labels"] == {"role": "debug"}
    assert "TTY:\t\ttrue" in h1.cli("service", "inspect", "--pretty", "shell").stdout
    h1.cli("service", "update", "--tty=false", "--restart-condition", "none", "shell")
    wait_until(lambda: [t for t in tasks(h1, "shell") if t["state"] == "complete"] or None,
               timeout=60, what="the shell without a terminal to end")
    # an update drops the settings: the replacement task writes its root again
    h1.cli("service", "update", "--read-only=false", "--sysctl-rm", "net.core.somaxconn",
           "locked")
    wait_until(lambda: logs_with(h1, "locked", "root-writable"), timeout=60,
               what="the updated task's output")


def test_agent_restart_adopts_tasks_and_reports_exits(lab_factory: Callable[..., Lab]
                                                      ) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "five", "--replicas", "5", "--", "sleep", "100000")
    h1.cli("service", "create", "--name", "short", "--restart-condition", "none", "--",
           "sh", "-c", "read x < /dev/null; sleep 3; exit 7")
    before = {t["id"]: t["pid"] for t in running(h1, "five", 5)}
    running(h1, "short", 1)
    h1.kill_agent()
    time.sleep(4)  # `short` exits while the agent is down
    h1.start_agent()
    after = {t["id"]: t["pid"] for t in running(h1, "five", 5)}
    assert after == before  # the same processes, adopted
    done = wait_until(lambda: [t for t in tasks(h1, "short") if t["state"] == "failed"]
                      or None, timeout=30, what="exit code of the task that ended meanwhile")
    assert done[0]["exit_code"] == 7


def test_logs_follow_replacements_and_keep_a_stopped_tasks_last_words(
        lab_factory: Callable[..., Lab]) -> None:
    """`service logs -f` picks up every replacement of a crash-looping task from its first
    line, while another task of the service logs without pause (new tasks were looked for
    only in a quiet second, and a task seen before it ran was never tried again); and a task
    shut down by an update keeps its logs until it leaves the history, as Docker keeps the
    stopped container (they were deleted at once: its shutdown message was lost)."""
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1 = lab.hosts[0]
    loop = ('if [ "$(hostname)" = chat-1 ]; then while :; do echo tick; sleep 0.2; done; '
            'else echo "crash from $(hostname) $$"; sleep 0.5; exit 1; fi')
    h1.cli("service", "create", "-d", "--name", "chat", "--replicas", "2",
           "--restart-delay", "1s", "--", "sh", "-c", loop)
    proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{h1.netns}", "--",
                             str(lab.shoal), "-H", f"unix://{h1.sock}", "service", "logs",
                             "-f", "chat"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        crashed: set[str] = set()
        deadline = time.monotonic() + 40
        assert proc.stdout is not None
        while len(crashed) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "crash from" in line:
                crashed.add(line.split("|")[0].strip())  # (the task's name and id)
        failed = [t for t in tasks(h1, "chat") if t["state"] == "failed"]
        assert len(crashed) >= 3, (crashed, len(failed))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    h1.cli("service", "create", "--name", "last", "--stop-grace-period", "5s", "--", "sh", "-c",
           'trap "echo got TERM, cleaning up; exit 0" TERM; echo started; '
           'while :; do sleep 0.2; done')
    (old,) = running(h1, "last", 1)
    h1.cli("service", "update", "--env-add", "X=1", "last")
    out = wait_until(lambda: logs_with(h1, "last", "started", 2), timeout=30,
                     what="the new task's first line")
    assert "got TERM, cleaning up" in out, out
    assert "got TERM" in h1.cli("service", "logs", old["id"]).stdout
