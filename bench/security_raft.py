"""Cost of Raft encryption: writes/s and leader failover, encrypted vs plaintext, side by side.

    .venv/bin/python bench/security_raft.py [--rounds 3] [--writes 20000] [--window 2000]
                                            [--failovers 4] [--modes aes-gcm,fernet,plain]

Modes: ``aes-gcm`` — what shoal runs (shoal.raft.transport.AeadEncryptor under the Raft
secret); ``fernet`` — pysyncobj's own ``password=`` encryption (AES-128-CBC + HMAC-SHA256 +
base64), for comparison; ``plain`` — no encryption (never used by shoal).

Each round starts, for each mode in turn (so all see the same machine noise), a fresh group
of 3 Raft stores (shoal's RaftStore, RaftConfig defaults) in 3 processes on loopback
(127.0.0.1:24201-24203), then:

* throughput — the bench/raft_writes.py workload run inside the leader's process:
  ``task_status`` writes through RaftStore.propose with at most ``--window`` in flight,
  plus the median latency of 50 sequential writes, and the CPU time all 3 processes spent
  per 1,000 writes (the figure other load on the machine disturbs least);
* failover — ``--failovers`` times: 2 s idle, SIGKILL the leader's process, and have both
  survivors propose a write every 10 ms until one commits; the time from the kill to the
  first committed write. The killed store is restarted and catches up before the next run.

Prints per-round figures and, per mode, the median over all rounds, and the relative cost
of encryption. The 2 cores are shared by the 3 processes (and anything else running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raft_writes import throughput  # (the workload: bench/ is on sys.path)

ADDRS = ["127.0.0.1:24201", "127.0.0.1:24202", "127.0.0.1:24203"]
PASSWORD = "bench-" + "0123456789abcdef" * 2


# ----------------------------------------------------------------------------- node process

async def node_main(index: int, data_dir: str, mode: str) -> None:
    """One store; JSON commands on stdin, one JSON answer per line on stdout."""
    from shoal.raft import store as store_mod
    from shoal.raft.errors import CommandRejected, StoreError

    if mode == "fernet":  # pysyncobj's encryptor instead of shoal's
        from pysyncobj.encryptor import getEncryptor

        store_mod.AeadEncryptor = getEncryptor  # type: ignore[assignment,misc]
    password = None if mode == "plain" else PASSWORD
    store = store_mod.RaftStore(ADDRS[index], ADDRS, Path(data_dir), password)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def committed(cmd: dict[str, Any], timeout: float) -> bool:
        try:
            await store.propose(cmd, timeout)
        except CommandRejected:
            return True  # refused by the state machine = committed and applied
        except StoreError:
            return False
        return True

    while line := await reader.readline():
        req = json.loads(line)
        if req["cmd"] == "status":
            say({"leader": store.is_leader(), "index": store.index, "ready": store.is_ready(),
                 "cpu": time.process_time()})  # CPU seconds of the process, all threads
        elif req["cmd"] == "bench":
            say(await throughput(store, req["writes"], req["window"]))
        elif req["cmd"] == "race":
            say({"after": await race(float(req["t0"]), committed)})
    store.close()


async def race(t0: float, committed: Any) -> float | None:
    """Propose a write every 10 ms until one commits; seconds from ``t0`` to that commit."""
    done = asyncio.Event()
    first: list[float] = []

    async def one() -> None:
        if await committed({"op": "node_update", "id": "nobody", "now": 0.0}, 10.0) \
                and not first:
            first.append(time.time() - t0)
            done.set()
    tasks = []
    while not done.is_set() and time.time() - t0 < 20:
        tasks.append(asyncio.create_task(one()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return first[0] if first else None


# ----------------------------------------------------------------------------- driver

class Node:
    def __init__(self, index: int, data_dir: str, mode: str) -> None:
        self.index, self.data_dir, self.mode = index, data_dir, mode
        self.proc: asyncio.subprocess.Process | None = None
        # pysyncobj's own complaints (e.g. "truncating already-applied log entries")
        self.log = open(f"{data_dir}.log", "ab")  # noqa: SIM115 (lives with the node)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--node", str(self.index), "--data-dir", self.data_dir,
            "--mode", self.mode, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self.log)

    async def ask(self, req: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        out: dict[str, Any] = json.loads(line)
        return out

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    def close(self) -> None:
        self.log.close()


async def wait_leader(nodes: list[Node], timeout: float = 30.0) -> Node:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in nodes:
            if n.proc and n.proc.returncode is None and (await n.ask({"cmd": "status"}))[
                    "leader"]:
                return n
        await asyncio.sleep(0.05)
    raise SystemExit("no leader within 30 s")


async def run_mode(mode: str, writes: int, window: int, failovers: int
                   ) -> tuple[dict[str, Any], list[float]]:
    with tempfile.TemporaryDirectory(prefix="shoal-secbench-") as tmp:
        nodes = [Node(i, f"{tmp}/n{i}", mode) for i in range(3)]
        try:
            for n in nodes:
                await n.start()
            leader = await wait_leader(nodes)
            await asyncio.sleep(1.0)
            cpu0 = [(await n.ask({"cmd": "status"}))["cpu"] for n in nodes]
            tp = await leader.ask({"cmd": "bench", "writes": writes, "window": window})
            cpu1 = [(await n.ask({"cmd": "status"}))["cpu"] for n in nodes]
            # CPU of all 3 processes per 1,000 writes: unlike writes/s, barely moved by
            # other load on the machine
            tp["cpu_ms"] = (sum(cpu1) - sum(cpu0)) / (writes + 50) * 1e6
            times: list[float] = []
            for _ in range(failovers):
                await asyncio.sleep(2.0)
                leader = await wait_leader(nodes)
                survivors = [n for n in nodes if n is not leader]
                await leader.kill()
                t0 = time.time()
                res = await asyncio.gather(*(s.ask({"cmd": "race", "t0": t0})
                                             for s in survivors))
                done = [r["after"] for r in res if r["after"] is not None]
                if not done:
                    tail = Path(f"{survivors[0].data_dir}.log").read_text(errors="replace")
                    print(f"  {mode}: no write committed within 20 s of the kill; this "
                          "group is skipped for the rest of the round. A survivor's log:\n"
                          + "\n".join(tail.splitlines()[-12:]), flush=True)
                    break
                times.append(min(done))
                await leader.start()
                new = await wait_leader(survivors)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    a, b = await leader.ask({"cmd": "status"}), await new.ask({"cmd": "status"})
                    if a["ready"] and a["index"] >= b["index"]:
                        break
                    await asyncio.sleep(0.1)
            return tp, times
        finally:
            for n in nodes:
                await n.kill()
                n.close()


async def driver(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    results: dict[str, dict[str, list[float]]] = {
        m: {"wps": [], "lat": [], "failover": [], "cpu": []} for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            tp, fo = await run_mode(mode, args.writes, args.window, args.failovers)
            res = results[mode]
            res["wps"].append(tp["wps"])
            res["lat"].append(tp["lat"])
            res["cpu"].append(tp["cpu_ms"])
            res["failover"] += fo
            print(f"round {r + 1} {mode}: {tp['wps']:,.0f} writes/s (errors {tp['errors']}), "
                  f"{tp['cpu_ms']:.0f} ms CPU per 1,000 writes, "
                  f"sequential {tp['lat'] * 1000:.0f} ms, failover "
                  f"{', '.join(f'{t * 1000:.0f}' for t in fo)} ms", flush=True)
    med = {m: {k: statistics.median(v) for k, v in results[m].items()} for m in modes}
    print()
    print(f"| Raft transport | writes/s (window {args.window}, median of {args.rounds}) | "
          "CPU per 1,000 writes (3 processes) | sequential write | failover median "
          f"(n={len(results[modes[0]]['failover'])}) |")
    print("|---|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {med[m]['wps']:,.0f} | {med[m]['cpu']:.0f} ms | "
              f"{med[m]['lat'] * 1000:.0f} ms | {med[m]['failover'] * 1000:.0f} ms |")
    if "plain" in med:
        base = med["plain"]
        for m in modes:
            if m != "plain":
                print(f"{m}: costs {(1 - med[m]['wps'] / base['wps']) * 100:.0f} % of write "
                      f"throughput, {(med[m]['cpu'] / base['cpu'] - 1) * 100:+.0f} % CPU per "
                      f"write; failover {(med[m]['failover'] - base['failover']) * 1000:+.0f}"
                      " ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--failovers", type=int, default=4)
    ap.add_argument("--node", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="aes-gcm,fernet,plain")
    ap.add_argument("--mode", default="aes-gcm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node >= 0:
        asyncio.run(node_main(args.node, args.data_dir, args.mode))
    else:
        asyncio.run(driver(args))


if __name__ == "__main__":
    main()
