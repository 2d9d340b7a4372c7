#!/usr/bin/env python3
"""shoal in five minutes: a 3-manager cluster on one machine survives losing its leader.

Builds three "hosts" (network namespaces on a private bridge, see tests/netlab.py), starts a
shoal agent on each, forms a cluster of three managers, deploys a 3-replica web service, scales
it to 5, changes its update settings (no task restarts: only the task template redeploys), rolls
out a new environment two tasks at a time, kills the leader's agent with SIGKILL and shows the
survivors electing a new leader and replacing the lost tasks. Everything is torn down at the
end, also on failure, Ctrl-C or SIGTERM.

Needs root (network namespaces). Run it with `make demo`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import netlab  # found through the sys.path entry above
from netlab import Host, Lab, wait_until

SERVICE = "web"
COMMAND = ["python3", "-m", "http.server", "8000"]


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and why."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinds like KeyboardInterrupt so every finally runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_interrupted = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    if _interrupted:  # a second Ctrl-C while cleaning up: keep cleaning up
        return
    _interrupted = True
    raise Interrupted(signum)


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str) -> None:
    print(textwrap.indent(text.rstrip(), "    "), flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Turn any failure inside into DemoFailed naming the step."""
    try:
        yield
    except (DemoFailed, Interrupted):
        raise
    except Exception as exc:
        raise DemoFailed(f"{what}: {exc}") from exc


def running_tasks(host: Host, exclude_node: str | None = None) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = host.cli_json("service", "ps", SERVICE)
    return [t for t in tasks
            if t.get("desired_state") == "running" and t.get("state") == "running"
            and (exclude_node is None or t.get("node_id") != exclude_node)]


def wait_running(host: Host, count: int, timeout: float,
                 exclude_node: str | None = None) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        tasks = running_tasks(host, exclude_node)
        return tasks if len(tasks) == count else None

    where = f" off node {exclude_node}" if exclude_node else ""
    return wait_until(enough, timeout=timeout, interval=0.5,
                      what=f"{count} running tasks of {SERVICE}{where} (asked {host.name})")


def host_of(lab: Lab, node: dict[str, Any]) -> Host:
    """The lab host a `node ls` entry describes (by address, else by hostname)."""
    for key in (str(node.get("addr", "")), str(node.get("hostname", ""))):
        if key:
            try:
                return lab.host(key)
            except netlab.LabError:
                continue
    raise DemoFailed(f"no lab host matches node {node}")


def leader_of(host: Host) -> dict[str, Any] | None:
    nodes: list[dict[str, Any]] = host.cli_json("node", "ls", timeout=10)
    leaders = [n for n in nodes if n.get("manager_status") == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def first_answer(hosts: list[Host], query: Callable[[Host], Any]) -> Any:
    """Ask each host in turn; the first truthy answer wins (a survivor may still be electing)."""
    errors: list[str] = []
    for h in hosts:
        try:
            answer = query(h)
        except Exception as exc:
            errors.append(f"{h.name}: {exc}")
            continue
        if answer:
            return answer
    if errors:
        raise DemoFailed("; ".join(errors))
    return None


def run_demo(lab: Lab, timeout: float) -> None:
    h1, h2, h3 = lab.hosts

    say(f"Starting a shoal agent on each host ({', '.join(f'{h.name}={h.ip}' for h in lab)})...")
    with step("starting agents"):
        for h in lab:
            h.start_agent(timeout=timeout)
            print(f"    {h.name}: agent pid {h.agent_pid}, socket {h.sock}")

    say(f"Creating the cluster on {h1.name} (shoal init)...")
    with step("shoal init"):
        show(h1.cli("init").stdout)

    say(f"Joining {h2.name} and {h3.name} as managers...")
    with step("joining managers"):
        token = h1.cli("join-token", "manager", "-q").stdout.strip()
        for h in (h2, h3):
            show(h.cli("join", "--token", token, f"{h1.ip}:2377", timeout=timeout).stdout)

    say("Waiting until all three nodes are ready...")
    with step("waiting for nodes"):
        wait_until(lambda: len([n for n in h1.cli_json("node", "ls")
                                if n.get("state") == "ready"]) == 3,
                   timeout=timeout, interval=0.5, what="3 ready nodes in `node ls`")
        show(h1.cli("node", "ls").stdout)

    say(f"Deploying service {SERVICE}: 3 replicas of `{' '.join(COMMAND)}`...")
    with step("creating the service"):
        show(h1.cli("service", "create", "--name", SERVICE, "--replicas", "3", "--",
                    *COMMAND).stdout)
        wait_running(h1, 3, timeout)
        show(h1.cli("service", "ps", SERVICE).stdout)

    say(f"Scaling {SERVICE} to 5 replicas...")
    with step("scaling the service"):
        show(h1.cli("service", "scale", f"{SERVICE}=5").stdout)
        wait_running(h1, 5, timeout)
        show(h1.cli("service", "ps", SERVICE).stdout)

    say(f"Changing {SERVICE}'s update settings: only a change of the task template replaces "
        "tasks, so nothing restarts...")
    with step("changing the update settings"):
        def live_ids() -> set[str]:
            return {t["id"] for t in h1.cli_json("service", "ps", SERVICE)
                    if t["state"] == "running" and t["desired_state"] == "running"}
        before = live_ids()
        show(h1.cli("service", "update", "--update-parallelism", "2", "--update-delay", "1s",
                    SERVICE).stdout)
        time.sleep(2)  # several leader passes
        print(f"    {len(before & live_ids())}/{len(before)} tasks untouched")

    say(f"Rolling update of {SERVICE} (a new environment variable), 2 tasks at a time...")
    with step("rolling update"):
        show(h1.cli("service", "update", "--env-add", "GREETING=hello", SERVICE).stdout)
        wait_until(lambda: h1.cli_json("service", "inspect", SERVICE)[0]["update_status"][
            "state"] == "completed", timeout=timeout, interval=0.5, what="update completed")
        wait_running(h1, 5, timeout)
        print(f"    update completed; {len(before & live_ids())} of the old tasks left")
        show(h1.cli("service", "ps", SERVICE).stdout)

    say(f"Running a command inside one of {SERVICE}'s tasks on another host, from {h1.name} "
        "(shoal exec: the manager relays it to the task's node)...")
    with step("shoal exec"):
        task = next(t for t in h1.cli_json("service", "ps", SERVICE)
                    if t["state"] == "running" and t["node"] != h1.name)
        out = h1.cli("exec", task["name"], "sh", "-c",
                     'echo "$GREETING from $(hostname)"').stdout
        print(f"    {task['name']} on {task['node']}: {out.strip()}")

    say("Finding the leader...")
    with step("finding the leader"):
        old = wait_until(lambda: leader_of(h1), timeout=timeout, what="one leader in node ls")
        victim = host_of(lab, old)
        survivors = [h for h in lab if h is not victim]
        print(f"    the leader is {victim.name} ({victim.ip}), node {old.get('id')}")

    say(f"Killing the leader's agent ({victim.name}) with SIGKILL...")
    with step("killing the leader"):
        killed_at = time.monotonic()
        victim.kill_agent(signal.SIGKILL)

    say(f"Waiting for {' and '.join(h.name for h in survivors)} to elect a new leader...")
    with step("electing a new leader"):
        def new_leader() -> dict[str, Any] | None:
            found: dict[str, Any] | None = first_answer(survivors, leader_of)
            return found if found and found.get("id") != old.get("id") else None

        new = wait_until(new_leader, timeout=timeout, interval=0.1, what="a new leader")
        elected = time.monotonic() - killed_at
        print(f"    new leader: {host_of(lab, new).name} (node {new.get('id')}), "
              f"{elected:.2f} s after the kill")

    say(f"Waiting until {SERVICE} has 5 running tasks again, none on {victim.name}...")
    with step("replacing the lost tasks"):
        asker = host_of(lab, new)
        wait_running(asker, 5, timeout, exclude_node=str(old.get("id")))
        healed = time.monotonic() - killed_at
        print(f"    service healed {healed:.2f} s after the kill")
        show(asker.cli("node", "ls").stdout)
        show(asker.cli("service", "ps", SERVICE).stdout)

    say(f"Failover summary: new leader after {elected:.2f} s, "
        f"5/5 tasks running again after {healed:.2f} s.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Needs root. Leaves nothing behind: namespaces, processes and data dirs are "
               "removed at the end, also on failure, Ctrl-C or SIGTERM.")
    parser.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                        help="how long each step may take (default: %(default)s)")
    parser.add_argument("--base-dir", type=Path, default=None, metavar="DIR",
                        help=f"where the hosts' data dirs go (default: {netlab.STATE_DIR})")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "unshare", "tini"):
        if shutil.which(tool) is None:
            print(f"demo: `{tool}` not found: run `make venv` (installs iproute2, util-linux, "
                  "tini)", file=sys.stderr)
            return 2
    if not netlab.shoal_bin().exists():
        print(f"demo: {netlab.shoal_bin()} not found: run `make venv`", file=sys.stderr)
        return 2

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    lab: Lab | None = None
    rc = 0
    started = time.monotonic()
    try:
        removed = netlab.sweep()
        if removed:
            print(f"demo: removed {len(removed)} leftover(s) of earlier crashed runs")
        say("Building a 3-host lab: network namespaces h1..h3 on a private bridge...")
        lab = Lab(3, args.base_dir)
        for h in lab:
            print(f"    {h.name}: {h.ip} in netns {h.netns}, data dir {h.data_dir}")
        run_demo(lab, args.timeout)
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        if lab is not None:
            for h in lab:
                print(h.log_tail(15), file=sys.stderr)
        rc = 1
    except Interrupted as exc:
        print(f"\ndemo: interrupted by {exc}, cleaning up...", file=sys.stderr)
        rc = 128 + exc.signum
    except netlab.LabError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        rc = 1
    finally:
        global _interrupted
        _interrupted = True  # from here on a signal must not cut the teardown short
        if lab is not None:
            say("Tearing down the lab (agents, tasks, namespaces, data dirs)...")
            left = lab.close()
            if left:
                print("demo: could not remove:\n  " + "\n  ".join(left), file=sys.stderr)
                rc = rc or 1
            else:
                print("    nothing left behind")
        if rc == 0:
            print(f"\ndemo: done in {time.monotonic() - started:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
