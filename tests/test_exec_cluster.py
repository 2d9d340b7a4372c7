"""`shoal exec` (node/execs.py, cli/execcli.py) in a real two-host cluster: a command in a
running task's namespaces, cgroups and root with its credentials and environment, on the
node that runs it or relayed there by a manager; `-i` (stdin), `-t` (a terminal of the
task's own devpts), `-u`, `-w`, `-e`; the exit code as the CLI's; what a worker and an
unknown task answer.

Hosts are network namespaces (tests/netlab.py) running real agents; the tasks run busybox.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_runtime_cluster import import_busybox

from netlab import Host, Lab, wait_until


def _task_on(h: Host, svc: str, node: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((t for t in h.cli_json("service", "ps", svc)
                     if t["node"] == node and t["state"] == "running"), None)
    found = wait_until(find, timeout=60, what=f"{svc}'s task running on {node}")
    assert found is not None
    return found


def _exec(h: Host, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`shoal exec ARGS` on ``h``: (exit code, stdout, stderr); ``stdin`` piped in."""
    cli = shlex.join([*h.shoal_argv, "-H", f"unix://{h.sock}", "exec", *args])
    if stdin is not None:
        cli = f"printf %s {shlex.quote(stdin)} | {cli}"
    res = h.run("sh", "-c", cli, check=False, timeout=60)
    return res.returncode, res.stdout, res.stderr


def test_exec_runs_in_the_task_on_its_node_or_through_a_manager(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1, h2 = lab.hosts
    import_busybox(h1, tmp_path)
    h1.cli("service", "create", "--name", "web", "--mode", "global", "--image", "busybox:1",
           "-e", "FROM_SPEC=yes", "--user", "app", "--health-cmd", "true",
           "--health-interval", "1", "--", "sh", "-c", "echo started; sleep 100000")
    local, remote = _task_on(h1, "web", "h1"), _task_on(h1, "web", "h2")
    # (docker's `service logs TASK`: one task's log, by its name or an id prefix)
    for ref in (remote["name"], remote["id"][:8]):
        lines = wait_until(lambda r=ref: h1.cli("service", "logs", r).stdout.splitlines()
                           or None, timeout=20, what=f"the log of {ref}")
        assert len(lines) == 1 and "@h2" in lines[0] and "started" in lines[0], lines
    gone = h1.cli("service", "logs", "nope.1", check=False)
    assert gone.returncode != 0 and "no such service or task: nope.1" in gone.stderr
    probe = ("echo host=$(hostname) uid=$(id -u) spec=$FROM_SPEC extra=$EXTRA dir=$(pwd); "
             "cat /proc/1/cmdline | tr '\\0' ' '; echo; exit 3")
    for task in (local, remote):  # (h2's task: relayed by the manager h1)
        code, out, err = _exec(h1, "-e", "EXTRA=1", task["name"], "sh", "-c", probe)
        assert code == 3, (task["node"], out, err)
        assert "uid=1000 spec=yes extra=1 dir=/" in out and "host=h1 " not in out, out
        assert "tini -- sh -c echo started" in out, out  # the task's own pid 1 (tini)
    # the task id, a prefix, Docker's SERVICE.SLOT.ID; -u and -w
    code, out, _ = _exec(h1, "-u", "root", "-w", "/tmp", remote["id"][:8], "sh", "-c",
                         "id -u; pwd")
    assert (code, out.split()) == (0, ["0", "/tmp"]), out
    code, out, _ = _exec(h1, f"{remote['name']}.{remote['id']}", "echo", "by-container-name")
    assert (code, out) == (0, "by-container-name\n")
    # -i: stdin to the command, its end too (cat ends)
    code, out, _ = _exec(h1, "-i", remote["name"], "cat", stdin="hello from stdin\n")
    assert (code, out) == (0, "hello from stdin\n")
    # -t: a terminal of the task's own devpts, stderr on it too
    code, out, _ = _exec(h1, "-t", remote["name"], "sh", "-c", "tty; echo err >&2")
    assert code == 0 and out.replace("\r\n", "\n").split() == ["/dev/pts/0", "err"], out
    # -i -t: a shell reading its terminal, which the piped input reaches
    code, out, _ = _exec(h1, "-i", "-t", remote["name"], "sh", stdin="echo hi $((6*7))\nexit 7\n")
    assert code == 7 and "hi 42" in out, out
    # -i -t with more input than a terminal buffers: all of it, then its end (^D)
    code, out, _ = _exec(h1, "-i", "-t", remote["name"], "sh", "-c",
                         "busybox stty -echo; busybox wc -c", stdin=("x" * 99 + "\n") * 1000)
    # (what arrived before stty ran is echoed: the count ends the output)
    assert code == 0 and out.split()[-1].endswith("100000"), out[-200:]
    # a client that goes away ends its command in the task (relayed: the manager's socket
    # to the node closes too)
    for flags, sleeper in (((), "sleep 4242"), (("-t",), "sleep 4343"),
                           (("-i",), "sleep 4747"), (("-i", "-t"), "sleep 4848")):
        # (with -t the command has a session of its own and here ignores the hang-up; with
        # -i its stdin is full, unread: the agent waits to write it when the client goes)
        cli = shlex.join([*h1.shoal_argv, "-H", f"unix://{h1.sock}", "exec", *flags,
                          remote["name"], "sh", "-c", f"trap '' HUP; {sleeper}"])
        feed = "yes | head -c 3000000 | " if "-i" in flags else ""
        client = h1.spawn("sh", "-c", f"{feed}exec {cli}", log_name="exec-client")

        def in_task(s: str = sleeper) -> bool:
            return s in _exec(h1, remote["name"], "sh", "-c",
                              "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")[1]
        # killed once its command runs in the task (before: a fixed 3 s each), never before
        wait_until(in_task, timeout=20, interval=0.1, what=f"{sleeper} running in the task")
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
        wait_until(lambda s=sleeper: not in_task(s), timeout=10,
                   what=f"{sleeper} to end with its client")
    # the task's pid namespace: its own processes, the exec's
    code, out, _ = _exec(h1, remote["name"], "sh", "-c",
                         "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    assert code == 0 and "sleep 100000" in out and len(out.splitlines()) < 8, out
    # the command runs under the task's seccomp filter (Docker's default profile), as the
    # task's own processes: it cannot make a namespace the task could not
    code, out, _ = _exec(h1, remote["name"], "sh", "-c",
                         "grep Seccomp: /proc/self/status; unshare -U true || echo refused")
    assert code == 0 and out.split() == ["Seccomp:", "2", "refused"], out
    # nothing of the agent's reaches the command: only its stdio (before: the helper binary's
    # fd, which root in the task could write through), and the task's environment (here an
    # -e LD_PRELOAD) is the command's alone, not the host stages' (before: the host's shell
    # and nsenter ran with it, as root, outside the task)
    code, out, err = _exec(h1, "-u", "root", "-e", "LD_PRELOAD=/nonexistent.so",
                           remote["name"], "sh", "-c", "busybox ls /proc/self/fd; "
                           "echo preload=$LD_PRELOAD")
    assert code == 0 and out.split() == ["0", "1", "2", "3", "preload=/nonexistent.so"], out
    assert "ld.so" not in err, err
    # -u is looked up in the task's own root: a symlink there to a host file names nobody
    host_passwd = tmp_path / "hostpasswd"
    host_passwd.write_text("evil:x:4242:4242::/:/bin/sh\n")
    assert _exec(h1, "-u", "root", remote["name"], "busybox", "ln", "-sf", str(host_passwd),
                 "/etc/passwd")[0] == 0
    code, out, err = _exec(h1, "-u", "evil", remote["name"], "id", "-u")
    assert code == 125 and "no user evil" in err and "4242" not in out, (out, err)
    # ... and read by execdrop with care: a group line naming the user 2,000 times (before:
    # a stack overflow of the 256 groups, stack words as gids), a passwd line of one field
    # (before: its uid read from the next line, root's)
    members = ",".join(["app"] * 2000)
    passwd = "nofields\\nroot:x:0:0::/:/bin/sh\\napp:x:1000:1000::/:/bin/sh\\n"
    code, out, err = _exec(h1, "-i", "-u", "0", remote["name"], "sh", "-c",
                           f"busybox rm /etc/passwd; printf '{passwd}' > /etc/passwd; "
                           "cat >> /etc/group", stdin=f"g:x:7:{members}\n")
    assert code == 0, (out, err)
    code, out, err = _exec(h1, "-u", "app", remote["name"], "id", "-G")
    assert (code, sorted(out.split())) == (0, ["1000", "50", "7"]), (out, err)
    code, _, err = _exec(h1, "-u", "nofields", remote["name"], "id", "-u")
    assert code == 125 and "no user nofields" in err, err
    # a large output reaches a client whole, with the exit code after it
    code, out, _ = _exec(h1, remote["name"], "busybox", "head", "-c", "3000000", "/dev/zero")
    assert (code, len(out)) == (0, 3000000)
    # -w: a directory of the task; one it lacks is said (126, as docker's)
    code, _, err = _exec(h1, "-w", "/nope", remote["name"], "echo")
    assert code == 126 and "workdir /nope" in err, err
    # errors: a command the task lacks, an unknown task, a worker asked for another node's
    code, _, err = _exec(h1, remote["name"], "no-such-command")
    assert code == 127 and "no-such-command" in err, err
    code, _, err = _exec(h1, "nope.9", "echo")
    assert code != 0 and "no task 'nope.9'" in err, err
    code, _, err = _exec(h2, local["name"], "echo")
    assert code != 0 and "runs on node h1" in err and "manager" in err, err
    code, out, _ = _exec(h2, remote["name"], "echo", "on-the-worker-itself")
    assert (code, out) == (0, "on-the-worker-itself\n")
    # -d: answered once the command started, which runs on without its client (relayed
    # here); with -i its stdin stays open (cat waits on it); a command the task lacks is
    # said as without -d
    code, out, err = _exec(h1, "-d", remote["name"], "sh", "-c",
                           "sleep 0.5; echo late > /tmp/detached; exec sleep 4949")
    assert (code, out, err) == (0, "", ""), (out, err)
    assert _exec(h1, "-d", "-i", remote["name"], "cat")[0] == 0
    assert _exec(h1, "-d", "-i", "-t", remote["name"], "sh")[0] == 0
    wait_until(lambda: _exec(h1, remote["name"], "cat", "/tmp/detached")[1] == "late\n" or None,
               timeout=10, what="the detached command's file")
    procs = _exec(h1, remote["name"], "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")[1]
    assert "sleep 4949" in procs and "cat" in procs.split() and "sh" in procs.split(), procs
    # -i -t: docker's detach keys (ctrl-p,ctrl-q) leave the command running; with
    # --detach-keys others, and only they; those typed after what went before
    # (the commands cannot end by themselves: the CLI returns only by detaching)
    code, out, _ = _exec(h1, "-i", "-t", remote["name"], "sh", "-c",
                         "read x; sleep 5353; true", stdin="typed\r\x10\x11")
    assert code == 0, out
    code, _, _ = _exec(h1, "-i", "-t", "--detach-keys", "ctrl-a,x", remote["name"], "sh",
                       "-c", "read x; sleep 5454; true", stdin="\x10\x11\r\x01x")
    assert code == 0
    code, _, _ = _exec(h1, "-i", "-t", "--detach-keys", "", remote["name"], "sh",
                       stdin="\x10\x11exit 5\n")
    assert code == 5
    procs = _exec(h1, remote["name"], "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")[1]
    assert "read x; sleep 5353" in procs and "read x; sleep 5454" in procs, procs
    code, _, err = _exec(h1, "-d", remote["name"], "no-such-command")
    assert code == 127 and "no-such-command" in err, err
    # ... and so is one whose exec itself fails (an interpreter the task lacks): -d answers
    # only once the exec happened (execdrop's close-on-exec pipe)
    _exec(h1, remote["name"], "sh", "-c", "printf '#!/nonexistent\\n' > /tmp/bad; "
          "chmod +x /tmp/bad")
    code, _, err = _exec(h1, "-d", remote["name"], "/tmp/bad")
    assert code == 127 and "/tmp/bad" in err, err
    # no terminal's master reaches a later exec's processes (the -t ones above still run:
    # before, every later nsenter inherited them, and the terminals never hung up)
    agent = h2.agent_pid
    assert agent is not None
    children = [c for t in Path(f"/proc/{agent}/task").iterdir()
                for c in (t / "children").read_text().split()]
    held = [(c, link) for c in children for link in _links(int(c)).values()
            if "ptmx" in link or "pts" in link]
    assert children and held == [], held
    # the relaying manager logs who asked
    assert "relayed" in h1.agent_log.read_text() and "the local socket" in \
        h1.agent_log.read_text()
    # --privileged: the node's capabilities, not the task's smaller set
    caps = {flag: _exec(h1, *flag, "-u", "root", remote["name"], "sh", "-c",
                        "grep CapEff /proc/self/status")[1].split()[-1]
            for flag in ((), ("--privileged",))}
    bounding = next(line.split()[1] for line in Path("/proc/self/status").read_text()
                    .splitlines() if line.startswith("CapBnd:"))
    assert caps[("--privileged",)] == bounding != caps[()], caps
    # the exec health checks and `shoal exec` share the node's one sealed helper
    pid = h2.agent_pid
    assert pid is not None
    helpers = [fd for fd in Path(f"/proc/{pid}/fd").iterdir()
               if "memfd:shoal-execdrop" in os.readlink(fd)]
    assert len(helpers) == 1, helpers
    # what the node's children hold: uvloop's spawn ignores close_fds, so any descriptor of
    # the agent without close-on-exec would reach every child (task shims, execs, health
    # checks, the balancer); none shares a socket or pipe with the agent, a task's processes
    # hold their stdio alone, the balancer worker no inherited descriptor but its control
    # socket (before: libuv's duplicates of the agent's stdio, for its whole life)
    held = _descriptors(pid)
    ours = {link for link in held.get(pid, {}).values() if link.startswith(("socket:", "pipe:"))}
    del held[pid]
    assert held and {c: sorted(set(fds.values()) & ours) for c, fds in held.items()
                     if set(fds.values()) & ours} == {}, held
    shims = [c for c in held if " shim " in _cmdline(c)]
    tasks = [t for shim in shims for t in _tree(shim)]
    assert shims and tasks and {t: sorted(held[t]) for t in tasks if t in held} == \
        {t: [0, 1, 2] for t in tasks if t in held}, {t: held.get(t) for t in tasks}
    (lb,) = [c for c in held if "-m shoal.lb" in _cmdline(c)]
    control = int(_cmdline(lb).split("--control-fd ")[1].split()[0])
    assert _inherited(lb) == [0, 1, 2, control], held[lb]


def _tree(pid: int) -> list[int]:
    """The descendants of ``pid`` (those alive while it looks)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        try:
            children = [int(c) for t in Path(f"/proc/{todo.pop()}/task").iterdir()
                        for c in (t / "children").read_text().split()]
        except OSError:  # (ended meanwhile)
            continue
        out += children
        todo += children
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # (ended meanwhile)
        return ""


def _links(pid: int) -> dict[int, str]:
    """``pid``'s open descriptors → what each is; one closed, or the process ended, while
    they are read is left out (a short-lived child of the agent: a probe, a helper)."""
    out: dict[int, str] = {}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return out
    for f in fds:
        try:
            out[int(f.name)] = os.readlink(f)
        except OSError:
            continue
    return out


def _descriptors(pid: int) -> dict[int, dict[int, str]]:
    """``pid`` and its descendants → their open descriptors → what each is."""
    return {p: links for p in [pid, *_tree(pid)] if (links := _links(p))}


def _inherited(pid: int) -> list[int]:
    """The descriptors of ``pid`` without close-on-exec (O_CLOEXEC in its fdinfo flags)."""
    out = []
    for f in Path(f"/proc/{pid}/fdinfo").iterdir():
        flags = next(line.split()[1] for line in f.read_text().splitlines()
                     if line.startswith("flags:"))
        if not int(flags, 8) & os.O_CLOEXEC:
            out.append(int(f.name))
    return sorted(out)
