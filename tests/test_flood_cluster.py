"""An API flood against one manager of a real cluster (agents in netns hosts).

Thousands of concurrent requests from one local client to the leader's unix socket: the
client gets answers or 429s (shoal.node.limits), never a hang or a dropped connection; the
rest of the cluster sees no false suspicion of the flooded node (SWIM probes and Raft
heartbeats keep their time on its event loop), and the agent answers normally afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable

import aiohttp
import pytest

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns

REQUESTS = 10_000
CONNECTIONS = 400


async def _flood(sock: str) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    conn = aiohttp.UnixConnector(path=sock, limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        async def one(i: int) -> None:
            path = "/v1/services" if i % 2 else "/v1/nodes"
            async with s.get(f"http://agent{path}") as r:
                await r.read()
                statuses[r.status] += 1
        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return statuses


def test_a_flood_of_api_requests_starves_neither_gossip_nor_raft(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3)
    lab.form_cluster(managers=3)
    h1, h2 = lab.hosts[:2]
    leader = next(n for n in h1.cli_json("node", "ls") if n["manager_status"] == "leader")
    target = lab.host(leader["addr"])
    since = f"{time.time():.6f}"
    started = time.monotonic()
    statuses = asyncio.run(_flood(str(target.sock)))
    took = time.monotonic() - started
    print(f"flood: {REQUESTS} requests over {CONNECTIONS} connections in {took:.1f} s: "
          f"{dict(statuses)}")
    assert sum(statuses.values()) == REQUESTS
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses

    # nobody suspected the flooded node (its gossip runs on a thread of its own: acks do not
    # wait behind the requests on the agent's loop) and it kept its leadership
    for h in lab.hosts:
        res = h.cli("events", "--format", "json", "--since", since,
                    "--until", f"{time.time():.6f}")
        evs = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        gossip = [(e["action"], e["name"]) for e in evs if e["action"].startswith("gossip-")]
        assert gossip == [], (h.name, collections.Counter(gossip))
    nodes = wait_until(lambda: h2.cli_json("node", "ls"), timeout=10, what="node ls")
    assert {n["state"] for n in nodes} == {"ready"}
    assert next(n for n in nodes if n["manager_status"] == "leader")["addr"] == target.ip
    assert target.cli_json("service", "ls") == []
