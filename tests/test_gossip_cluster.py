"""Gossip failure detection and key rotation of real agents on netns hosts, with the default
(LAN) gossip preset — what a user gets.

Each test names the user-visible properties it checks; they share a cluster per test to keep
the multi-host time down (forming a 4-node cluster costs ~10 s on the 2-core CI machine).
"Never shown down" is checked two ways: a thread polls `node ls` on the manager while the
disturbance lasts, and every agent's gossip counters (`shoal info` → gossip.stats) must show
no new "dead" event, which catches even a death too brief for the poll to see.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from netlab import CommandError, Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]

# Sends one gossip packet (a ping) sealed under KEY_HEX to ADDR:PORT, from inside a lab host.
_SEND_PACKET = """
import socket, sys
from shoal.gossip import Keyring, wire
key, addr, port, target = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
payload = wire.build_payload([wire.encode_message(wire.Ping(7, target))])
data = wire.seal(payload, Keyring(key), wire.aad_for(wire.PACKET_AAD_KIND, ""))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data, (addr, port))
"""


def nodes(host: Host) -> dict[str, dict[str, Any]]:
    return {n["hostname"]: n for n in host.cli_json("node", "ls")}


def gossip_info(host: Host) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(host.cli("info").stdout)["gossip"]
    return info


def deaths(hosts: list[Host]) -> dict[str, int]:
    """How many members each host's gossip has declared dead so far."""
    return {h.name: gossip_info(h)["stats"].get("event.dead", 0) for h in hosts}


def running(host: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in host.cli_json("service", "ps", service)
            if t["state"] == "running" and t["desired_state"] == "running"]


def wait_running(host: Host, service: str, n: int, timeout: float = 40.0,
                 avoid: str = "") -> list[dict[str, Any]]:
    """Exactly ``n`` running tasks (none on ``avoid``), and no task running that should not."""
    def check() -> list[dict[str, Any]] | None:
        tasks = host.cli_json("service", "ps", service)
        live = [t for t in tasks if t["state"] == "running" and t["desired_state"] == "running"]
        extra = [t for t in tasks if t["state"] == "running" and t["desired_state"] != "running"]
        ok = len(live) == n and not extra and all(t["node"] != avoid for t in live)
        return live if ok else None
    return wait_until(check, timeout=timeout, interval=0.2,
                      what=f"exactly {n} running tasks of {service}" +
                      (f" none on {avoid}" if avoid else ""))


@contextmanager
def watch_nodes(manager: Host) -> Iterator[list[str]]:
    """Poll `node ls` on ``manager`` in a thread; yields the list of anomalies seen (a node
    not ready, or its membership not alive/suspect)."""
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with suppress(CommandError):  # a slow CLI call is not a down node
                for name, n in nodes(manager).items():
                    if n["state"] != "ready" or n["membership"] not in ("alive", "suspect"):
                        seen.append(f"{name}: {n['state']}/{n['membership']}")
            stop.wait(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=30)


def test_cut_off_worker_is_dead_its_tasks_move_it_heals_and_a_leave_is_not_a_death(
        lab_factory: Callable[..., Lab]) -> None:
    """Default preset, 1 manager + 3 workers.

    (a) Unplugging a worker: `node ls` shows it down with membership "dead" within a few
        seconds and its tasks run elsewhere; plugged back in, it is ready and "alive" again,
        its stale tasks are stopped and the service has exactly its replicas.
    (d) `shoal leave` on a worker: the others see it "left", never "dead".
    """
    lab = lab_factory(4)
    lab.form_cluster(managers=1, workers=3)
    h1, _h2, h3, h4 = lab.hosts
    h1.cli("service", "create", "--name", "web", "--replicas", "4", *SLEEP)
    tasks = wait_running(h1, "web", 4)
    stale = [t for t in tasks if t["node"] == h4.name]
    assert stale, "the scheduler spreads 4 replicas over 4 nodes"

    cut = time.monotonic()
    h4.cut_link()
    down = wait_until(lambda: nodes(h1)[h4.name]["state"] == "down", timeout=20, interval=0.1,
                      what="h4 down")
    detected = time.monotonic() - cut
    n4 = nodes(h1)[h4.name]
    assert n4["membership"] == "dead" and "gossip" in n4["message"], n4
    wait_running(h1, "web", 4, avoid=h4.name)
    moved = time.monotonic() - cut
    print(f"link cut: down after {detected:.2f}s, tasks running elsewhere after {moved:.2f}s")
    assert down
    detail = h1.cli_json("node", "inspect", "h4")[0]["gossip"]
    assert detail["state"] == "dead" and detail["incarnation"] >= 1
    assert abs(detail["state_since"] - time.time()) < 60
    # the stale tasks still run on the unplugged host (it cannot know yet)
    assert all(pid_alive(t["pid"]) for t in stale)

    h4.restore_link()
    wait_until(lambda: (lambda n: n["state"] == "ready" and n["membership"] == "alive")(
        nodes(h1)[h4.name]), timeout=40, interval=0.2, what="h4 ready and alive again")
    wait_until(lambda: not any(pid_alive(t["pid"]) for t in stale), timeout=30,
               what="h4's stale tasks stopped")
    wait_running(h1, "web", 4)
    assert h1.cli_json("node", "inspect", "h4")[0]["gossip"]["incarnation"] > 1  # refuted

    before = deaths([h1, lab.hosts[1]])
    h3.cli("leave")
    hid = wait_until(lambda: next((m for m, s in gossip_info(h1)["view"].items()
                                   if s == "left"), None), timeout=10, what="h3 seen left")
    assert hid not in {n["id"] for n in h1.cli_json("node", "ls")}  # removed from the state
    time.sleep(1.0)  # a death would need ≥ 0.8 s of suspicion: it would have happened by now
    assert gossip_info(h1)["view"][hid] == "left"
    assert deaths([h1, lab.hosts[1]]) == before


def test_key_rotation_pause_and_kill(lab_factory: Callable[..., Lab]) -> None:
    """Default preset, 1 manager + 3 workers.

    Key rotation: `shoal gossip rotate-key` rolls a new key through every node with no node
        ever shown down and no gossip death; afterwards every node holds only the new key (in
        node.json too), and a packet sealed under the old key is dropped (`drop.decrypt`).
    (c) An agent paused (SIGSTOP) for less than the minimum suspicion timeout is never
        shown down.
    (b) kill -9 of a worker's agent: down with membership "dead", tasks run elsewhere; when
        it restarts it is ready again and its stale tasks are stopped.
    """
    lab = lab_factory(4)
    lab.form_cluster(managers=1, workers=3)
    h1, h2, h3, h4 = lab.hosts
    old_key = json.loads((h2.data_dir / "node.json").read_text())["gossip_key"]
    h1.cli("service", "create", "--name", "app", "--replicas", "4", *SLEEP)
    tasks = wait_running(h1, "app", 4)

    before = deaths(lab.hosts)
    with watch_nodes(h1) as anomalies:
        res = h1.cli_json("gossip", "rotate-key")
        time.sleep(1.0)
    assert anomalies == [], anomalies
    assert deaths(lab.hosts) == before
    assert sorted(res["nodes"]) == ["h1", "h2", "h3", "h4"] and res["skipped"] == []
    for h in lab.hosts:
        keys = gossip_info(h)["keys"]
        assert keys["installed"] == [res["key"]], (h.name, keys)
        ident = json.loads((h.data_dir / "node.json").read_text())
        assert ident["gossip_key"] != old_key and ident["gossip_extra_keys"] == []
    # a packet under the old key is dropped; the members stay alive under the new one
    target = gossip_info(h2)
    drops = target["stats"].get("drop.decrypt", 0)
    h2_id = h1.cli_json("node", "inspect", "h2")[0]["id"]
    h1.run(sys.executable, "-c", _SEND_PACKET, old_key, h2.ip, "7946", h2_id)
    wait_until(lambda: gossip_info(h2)["stats"].get("drop.decrypt", 0) > drops, timeout=10,
               what="h2 counts the old-key packet as drop.decrypt")
    assert gossip_info(h2)["keys"]["refreshes"] == 0  # it asked a manager: nothing newer
    assert gossip_info(h1)["members"]["alive"] == 4

    # (c) a pause shorter than the minimum suspicion timeout (0.8 s) is not a failure
    assert gossip_info(h1)["probe_interval"] == 0.2
    pid = h3.agent_pid
    assert pid is not None
    before = deaths([h1, h2, h4])
    with watch_nodes(h1) as anomalies:
        for _ in range(2):
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)
            finally:
                os.kill(pid, signal.SIGCONT)
            time.sleep(1.5)
    assert anomalies == [], anomalies
    assert deaths([h1, h2, h4]) == before

    # (b) kill -9 of a worker's agent
    stale = [t for t in tasks if t["node"] == h4.name]
    killed = time.monotonic()
    h4.kill_agent()
    wait_until(lambda: nodes(h1)[h4.name]["state"] == "down", timeout=20, interval=0.1,
               what="h4 down after kill -9")
    detected = time.monotonic() - killed
    assert nodes(h1)[h4.name]["membership"] == "dead"
    wait_running(h1, "app", 4, avoid=h4.name)
    print(f"kill -9: down after {detected:.2f}s, tasks elsewhere after "
          f"{time.monotonic() - killed:.2f}s")
    h4.start_agent()
    wait_until(lambda: (lambda n: n["state"] == "ready" and n["membership"] == "alive")(
        nodes(h1)[h4.name]), timeout=30, interval=0.2, what="h4 ready and alive again")
    wait_until(lambda: not any(pid_alive(t["pid"]) for t in stale), timeout=30,
               what="h4's stale tasks stopped")
    wait_running(h1, "app", 4)


def test_nodes_gossip_sees_alive_beat_to_the_leader_at_the_slow_period(
        lab_factory: Callable[..., Lab]) -> None:
    """1 manager + 2 workers, real gossip: once the leader's gossip sees the workers alive it
    asks each for a heartbeat every 10 s instead of every second (gossip judges them), and a
    worker cut off is still down as fast as gossip finds it."""
    from test_events_cluster import scrape

    def received(h: Host) -> float:
        return scrape(h)["shoal_heartbeats_received"].samples[0].value

    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, _h2, h3 = lab.hosts
    time.sleep(3.0)  # gossip sees them; the next beat of each gets the 10 s period
    before = received(h1)
    time.sleep(15.0)
    beats = received(h1) - before
    print(f"heartbeats into the leader from 2 workers in 15 s: {beats:.0f}")
    assert beats <= 2 * 2, beats  # at 1 s: ~30
    cut = time.monotonic()
    h3.cut_link()
    wait_until(lambda: nodes(h1)[h3.name]["state"] == "down", timeout=20, interval=0.1,
               what="h3 down")
    print(f"cut worker down after {time.monotonic() - cut:.2f} s")
    assert "gossip" in nodes(h1)[h3.name]["message"]
