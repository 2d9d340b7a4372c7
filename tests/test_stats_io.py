"""`shoal stats` NET I/O and BLOCK I/O (docker stats' columns) and the same counters in
/metrics, from a real agent on a netns host: a task that sends 500 kB over TCP to another
service's task and writes then reads 2 MiB with O_DIRECT on a volume (the node's disk). A
host-network task has no traffic of its own to show. The parsers of the kernel's files are
checked on their documented formats."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import scrape_metrics

from netlab import Lab, wait_until
from shoal.cli.stats import rows
from shoal.runtime.cgroups import (
    Limits,
    TaskCgroups,
    _read_io_stat,
    _read_proc_io,
    detect,
    remove_parent,
)
from shoal.runtime.procfs import ProcRef, net_dev_bytes

SENT = 500_000
DIRECT = 32 * 65536  # bytes written, then read, with O_DIRECT (on a volume: the node's disk)
# (the tasks run the node's own root filesystem, read-only, so its python3)
SINK = ("import socket\ns = socket.create_server(('', 9000))\nc = s.accept()[0]\n"
        "while c.recv(65536): pass\nimport time; time.sleep(100000)")
SEND = (f"import socket, time\ntime.sleep(1)\nfor _ in range(60):\n"
        "    try: s = socket.create_connection((\"sink\", 9000)); break\n"
        f"    except OSError: time.sleep(0.5)\ns.sendall(bytes({SENT})); s.close()")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(1)
    try:
        lab.form_cluster(managers=1)
        yield lab
    finally:
        left = lab.close()
        assert not left, f"lab teardown left things behind: {left}"


@pytest.mark.netns
def test_stats_shows_a_tasks_network_and_block_io_and_metrics_export_them(lab: Lab) -> None:
    h = lab.hosts[0]
    h.cli("service", "create", "--name", "sink", "--", "python3", "-c", SINK)
    h.cli("service", "create", "--name", "src", "--mount", "type=volume,dst=/data", "--",
          "sh", "-c", f"python3 -c '{SEND}' && "
          "dd if=/dev/zero of=/data/io bs=65536 count=32 oflag=direct && "
          "dd if=/data/io of=/dev/null bs=65536 iflag=direct && sleep 100000")
    h.cli("service", "create", "--name", "hostnet", "--network", "host", "--",
          "sleep", "100000")

    def stats() -> dict[str, dict[str, Any]] | None:
        got = {r["name"].split(".")[0]: r for r in h.cli_json("stats", "--no-stream")}
        src = got.get("src", {})
        return got if len(got) == 3 and (src.get("block_read_bytes") or 0) >= DIRECT else None

    got = wait_until(stats, timeout=60, interval=1, what="src's traffic and direct I/O in stats")
    src, sink, hostnet = got["src"], got["sink"], got["hostnet"]
    assert src["net_tx_bytes"] >= SENT and sink["net_rx_bytes"] >= SENT, (src, sink)
    assert src["block_write_bytes"] >= DIRECT and src["block_read_bytes"] >= DIRECT, src
    assert sink["net_tx_bytes"] < SENT and src["net_rx_bytes"] < SENT  # (acks, DNS, no data)
    assert hostnet["net_io"] == "--" and hostnet["net_rx_bytes"] is None, hostnet
    tx = src["net_io"].partition(" / ")[2]
    assert tx.endswith("kB") and float(tx[:-2]) >= SENT / 1000, src["net_io"]
    assert src["block_io"].endswith("MB") and " / " in src["block_io"], src["block_io"]
    table = h.cli("stats", "--no-stream").stdout.splitlines()
    assert "NET I/O" in table[0] and "BLOCK I/O" in table[0], table[0]
    line = h.cli("stats", "--no-stream", "--format", "{{.Name}} {{.NetIO}} {{.BlockIO}}",
                 "src").stdout.split()
    assert line[0].startswith("src.") and line[2] == "/" and line[5] == "/", line
    # /metrics: the same counters, per task running here
    fams = scrape_metrics(h.sock)

    def value(name: str, task_id: str) -> float | None:
        return next((s.value for s in fams[name].samples if s.labels["task"] == task_id
                     and s.name.endswith("_total")), None)
    assert (value("shoal_task_network_transmit_bytes", src["id"]) or 0) >= SENT
    assert (value("shoal_task_network_receive_bytes", sink["id"]) or 0) >= SENT
    assert (value("shoal_task_block_write_bytes", src["id"]) or 0) >= DIRECT
    assert value("shoal_task_network_receive_bytes", hostnet["id"]) is None
    for name in ("sink", "src", "hostnet"):
        h.cli("service", "rm", name)
    h.cli("volume", "prune", "-f")


def test_io_stat_sums_every_device(tmp_path: Path) -> None:
    (tmp_path / "io.stat").write_text(
        "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
        "253:1 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    assert _read_io_stat(tmp_path / "io.stat") == (4196, 8192)
    assert _read_io_stat(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("")  # a group that did no I/O yet
    assert _read_io_stat(tmp_path / "empty") == (0, 0)


def test_proc_io_sums_the_listed_processes_and_skips_the_gone(tmp_path: Path) -> None:
    """Where no cgroup counts I/O: the processes of cgroup.procs, from /proc/PID/io — a
    process that reaped a child holds the child's counts too."""
    data = tmp_path / "f"
    child = subprocess.run(["sh", "-c", f"dd if=/dev/zero of={data} bs=65536 count=16 "
                            "oflag=direct 2>/dev/null; echo $$"], capture_output=True,
                           text=True, check=True)
    gone = int(child.stdout)  # (its pid, reaped: its counts are in this process's now)
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n{gone}\n")
    written = (_read_proc_io(tmp_path / "cgroup.procs") or (0, 0))[1]
    mine = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    assert 16 * 65536 <= written <= int(mine["write_bytes"]), (written, mine)  # (this process
    #   may have written more since: pytest's captured output)
    assert _read_proc_io(tmp_path / "missing") is None


def test_net_dev_counts_every_interface_but_lo_of_a_live_process() -> None:
    me = ProcRef.of(os.getpid())
    assert me is not None
    got = net_dev_bytes(me)
    text = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    want_rx = sum(int(line.split(":")[1].split()[0]) for line in text
                  if line.split(":")[0].strip() != "lo")
    assert got is not None and got[0] >= want_rx
    assert net_dev_bytes(ProcRef(me.pid, me.ticks + 1)) is None  # the pid names another


def test_stats_rows_print_docker_decimal_units_and_dashes_for_unknown() -> None:
    rec = {"id": "t1", "name": "web.1", "service": "web", "node": "n1", "memory_limit": 0,
           "usage": {"net_rx_bytes": 1234, "net_tx_bytes": 999_999,
                     "block_read_bytes": 0, "block_write_bytes": 45_600_000}}
    (r,) = rows([], [rec], 1.0)
    assert r["net_io"] == "1.23kB / 1MB" and r["block_io"] == "0B / 45.6MB"
    (r,) = rows([], [{**rec, "usage": {}}], 1.0)  # (an agent of before: no I/O fields)
    assert r["net_io"] == "--" and r["block_io"] == "--"


JOIN = 'for d in "$@"; do echo $$ > "$d/cgroup.procs"; done; '


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")
def test_block_io_never_goes_back_when_an_exec_in_the_task_ends(tmp_path: Path) -> None:
    """An exec (``shoal exec``, a healthcheck) joins the task's cgroups with its parent
    outside the task (node/health.py): what it wrote counts in the task's BLOCK I/O while it
    runs and stays counted once the agent has reaped it — the figure is a counter
    (/metrics' ``_total``), it never goes back."""
    layout = detect()
    parent = f"shoal-test-io-{os.getpid()}"
    group = TaskCgroups.create(layout, parent, "t1", Limits())
    dirs = [str(d) for d in group.dirs.values()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(["sh", "-c", JOIN + "exec sleep 1000", "sh", *dirs]))
        done = tmp_path / "done"
        procs.append(subprocess.Popen(["sh", "-c", JOIN + f"dd if=/dev/zero of={tmp_path}/f "
                                       f"bs=65536 count=32 oflag=direct 2>/dev/null; "
                                       f"touch {done}; exec sleep 1000", "sh", *dirs]))
        wait_until(lambda: done.exists() and len(group.pids_in()) == 2, timeout=30,
                   interval=0.05, what="the exec's write")
        during = group.usage().block_write_bytes or 0
        assert during >= DIRECT, during
        procs[1].kill()
        procs[1].wait()  # (reaped outside the task: its counts leave with it)
        wait_until(lambda: len(group.pids_in()) == 1, timeout=30, interval=0.05,
                   what="the exec's end")
        after = group.usage().block_write_bytes or 0
        assert after >= during, (during, after)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        wait_until(lambda: not group.pids_in(), timeout=30, interval=0.05, what="no process")
        assert not group.remove_now() and not remove_parent(layout, parent)
