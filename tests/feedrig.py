"""A worker's end of the state feed wired straight to a real manager-side Dispatcher in the
same process (no network, no TLS): what tests/test_feed_scale.py, tests/test_feed_filter.py
and bench/feed_bench.py run their StateFeeds on.

Owns: ``ADDR`` (the one manager's address in those tests) and ``feed_worker``. Must not
touch: the store or the dispatcher it is given (only their feed calls), the network.
"""

from __future__ import annotations

from typing import Any

from shoal.node.control.dispatcher import Dispatcher
from shoal.node.feed import FeedConfig, StateFeed
from shoal.node.pki import CertInfo

ADDR = "10.0.0.1"


def feed_worker(dispatcher: Dispatcher, node: str, config: FeedConfig) -> StateFeed:
    """Node ``node``'s StateFeed, its polls and reports answered by ``dispatcher`` as if
    they came over mTLS with a worker certificate of cluster c1."""
    peer = CertInfo(node, "worker", "c1", 1, 0.0, 4e9)

    async def call_bytes(addr: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        return await dispatcher.state_since(peer, body["after"], body["wait"],
                                            body.get("compress"))

    async def call_json(addr: str, path: str, body: dict[str, Any], timeout: float
                        ) -> dict[str, Any]:
        return await dispatcher.worker_report(peer, body["cmd"])

    return StateFeed(node, [f"{ADDR}:2377"], call_bytes, call_json, config)
