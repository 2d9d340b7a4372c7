"""Prometheus metrics of one node: ``GET /metrics`` (prometheus-client, text format 0.0.4).

Owns: this agent's metric registry (one per agent, never the library's global one, so
several agents in one test process do not mix), the collector that reads the node's parts
at scrape time, the API-duration middleware and the task start-latency histogram fed by the
event log. Must not touch: anything it reads (read-only views through the callables it is
given), policy, the network.

What it exports (names follow Prometheus conventions: base units, ``_total`` counters):

* Raft (managers): ``shoal_raft_term``, ``shoal_raft_commit_index``,
  ``shoal_raft_applied_index``, ``shoal_raft_apply_lag`` (commit - applied entries),
  ``shoal_raft_leader`` (1 on the leader), ``shoal_raft_has_quorum``,
  ``shoal_raft_leader_info{leader}``; every node: ``shoal_state_index`` (commands applied by
  its replica: the event cursor's index) and ``shoal_state_ready``.
* Gossip: ``shoal_gossip_members{state}``, ``shoal_gossip_health_score``,
  ``shoal_gossip_probe_rtt_seconds`` (histogram of acked direct probes),
  ``shoal_gossip_dropped_total{reason}``.
* Tasks: ``shoal_tasks{state}`` — tasks of the whole cluster by observed state, as this
  node's replica sees them (every node reports the same figures: aggregate with ``max``, not
  ``sum``); ``shoal_node_tasks`` (tasks the runtime here knows);
  ``shoal_task_start_latency_seconds`` (histogram, managers: created by the leader →
  reported RUNNING, both from the Raft log, observed as the RUNNING event is derived);
  per task running here: ``shoal_task_cpu_seconds_total``, ``shoal_task_memory_bytes`` (the
  working set), ``shoal_task_memory_peak_bytes``, ``shoal_task_pids``,
  ``shoal_task_block_read_bytes_total``, ``shoal_task_block_write_bytes_total`` (from the
  task's cgroups; absent where cgroups are not available),
  ``shoal_task_network_receive_bytes_total``, ``shoal_task_network_transmit_bytes_total`` (its
  own network namespace's counters; absent for a host-network task), with labels task,
  service, slot.
* Routing mesh (this node's balancer): ``shoal_lb_connections_total{service}``,
  ``shoal_lb_active_connections{service}``, ``shoal_lb_retries_total``,
  ``shoal_lb_failed_total``, ``shoal_lb_udp_dropped_total``, and per backend
  ``shoal_lb_backend_connections_total{service,task}``, ``…_active_connections``,
  ``…_failed_total``; bytes forwarded ``shoal_lb_bytes_total{service,direction}`` and
  ``shoal_lb_backend_bytes_total{service,task,direction}`` (direction ``in``: client →
  backend, ``out``: backend → client; TCP payload and UDP datagrams, both TCP engines).
* Workers' state feed (managers, shoal.node.feed.FeedStats): ``shoal_feed_replies_total{kind}``,
  ``shoal_feed_bytes_total{kind}`` (kind: commands, state, empty), ``shoal_feed_encodes_total``,
  ``shoal_feed_compressed_total``, ``shoal_feed_deferred_total``,
  ``shoal_feed_polls_held``, ``shoal_feed_catchups_waiting``.
* Heartbeats (managers): ``shoal_heartbeats_received_total`` (from other nodes; the
  leader's rate is what ``max_heartbeats_per_second`` and ``gossip_heartbeat_interval`` bound).
* Events (managers): ``shoal_events_total{type}``, ``shoal_events_retained``,
  ``shoal_events_gaps_total``.
* API: ``shoal_api_request_duration_seconds{route,method,status}`` (histogram; route is
  the route's template, e.g. ``/v1/services/{ref}``, so ids do not explode the labels): the
  local API and the cluster API (``/v1/cluster/*``), streams and held polls left out.

Task health checks (shoal.node.health) report in the task's status (``health``, its log:
``service ps``, the event stream), not as a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.node.events import Event, EventLog
from shoal.node.source import StateSource
from shoal.raft.models import TaskState
from shoal.runtime.controller import Controller

log = logging.getLogger("shoal.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# created → RUNNING: shoal measures ~20 ms on an idle LAN; image pulls take seconds
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GOSSIP_STATES = ("alive", "suspect", "dead", "left")
# streams stay open for as long as the client wants, and a worker's state-feed poll is held
# until there is news: their duration says nothing
STREAMING_ROUTES = frozenset({"/v1/events", "/v1/services/{ref}/logs", "/v1/cluster/state",
                              "/v1/cluster/logs"})


@dataclass
class Sources:
    """What the collector reads, each a callable returning the *current* part (or None)."""

    store: Callable[[], StateSource | None]
    runtime: Controller
    gossip: Callable[[], Any]  # shoal.node.membership.Membership | None
    balancer: Callable[[], Any]  # shoal.lb.Balancer | None
    events: EventLog
    # the manager side of the workers' state feed (shoal.node.feed.FeedStats), or None
    feed: Callable[[], Any] = lambda: None
    # heartbeats this manager received from other nodes (Dispatcher), or None (a worker)
    heartbeats: Callable[[], int | None] = lambda: None


class Metrics:
    """The node's registry. ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self.api_duration = Histogram(
            "shoal_api_request_duration_seconds", "Duration of API requests (streaming "
            "routes excluded) by route template, method and HTTP status: the local API and "
            "the cluster API (/v1/cluster/*: nodes' heartbeats, status reports, joins)",
            ["route", "method", "status"], buckets=API_BUCKETS, registry=self.registry)
        self.task_start = Histogram(
            "shoal_task_start_latency_seconds", "Tasks created by the leader → reported "
            "RUNNING (managers; from the Raft log)", buckets=START_BUCKETS,
            registry=self.registry)
        self.probe_rtt = Histogram(
            "shoal_gossip_probe_rtt_seconds", "Round-trip time of acked direct gossip probes",
            buckets=RTT_BUCKETS, registry=self.registry)
        self.events_total = Counter(
            "shoal_events", "Events derived from the applied log (and local gossip events)",
            ["type"], registry=self.registry)
        self._lb_stats: dict[str, Any] | None = None
        self.registry.register(_StateCollector(self))
        sources.events.on_event.append(self.observe_event)

    def observe_event(self, ev: Event) -> None:
        """Called by the event log on the applying thread (prometheus-client is thread-safe)."""
        self.events_total.labels(ev.type).inc()
        if ev.type == "task" and ev.action == "running" and not ev.local:
            seconds = ev.attributes.get("start_seconds")
            if isinstance(seconds, (int, float)):
                self.task_start.observe(float(seconds))

    async def render(self) -> bytes:
        """Refresh what must be fetched asynchronously (the balancer's counters, from its
        worker processes), then the text exposition of everything."""
        self._lb_stats = None
        balancer = self.sources.balancer()
        if balancer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    self._lb_stats = dict(await balancer.stats())
        gossip = self.sources.gossip()
        if gossip is not None:
            with contextlib.suppress(Exception):
                for rtt in await gossip.take_probe_rtts():
                    self.probe_rtt.observe(rtt)
        return await asyncio.to_thread(generate_latest, self.registry)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def timed(request: web.Request, handler: Callable[[web.Request], Awaitable[
                web.StreamResponse]]) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "unmatched"
                if route not in STREAMING_ROUTES:
                    self.api_duration.labels(route, request.method, str(status)).observe(
                        time.perf_counter() - start)
        return timed


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None
           ) -> GaugeMetricFamily:
    if labels:
        g = GaugeMetricFamily(name, doc, labels=list(labels))
        g.add_metric(list(labels.values()), value)
        return g
    return GaugeMetricFamily(name, doc, value=value)


class _StateCollector(Collector):
    """Reads the node's parts at scrape time (never caches state)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        for part in (self._raft, self._gossip, self._tasks, self._lb, self._events,
                     self._feed, self._heartbeats):
            try:
                yield from part()
            except Exception:  # one broken part must not hide the others
                log.exception("metrics: collecting %s failed", part.__name__)

    def _raft(self) -> Iterator[Metric]:
        store = self.m.sources.store()
        if store is None:
            return
        yield _gauge("shoal_state_index", "Commands applied by this node's replica",
                     store.index)
        yield _gauge("shoal_state_ready", "1 when this node's replica has caught up",
                     1.0 if store.is_ready() else 0.0)
        status_of = getattr(store, "status", None)
        if not callable(status_of) or store.self_addr is None:
            return  # a worker's feed: no Raft here
        st = status_of()
        commit, applied = int(st.get("commit_idx", 0)), int(st.get("last_applied", 0))
        yield _gauge("shoal_raft_term", "Current Raft term", float(st.get("raft_term", 0)))
        yield _gauge("shoal_raft_commit_index", "Raft commit index", commit)
        yield _gauge("shoal_raft_applied_index", "Last Raft entry applied here", applied)
        yield _gauge("shoal_raft_apply_lag", "Committed Raft entries not yet applied here",
                     max(0, commit - applied))
        yield _gauge("shoal_raft_leader", "1 if this manager leads (with quorum)",
                     1.0 if store.is_leader() else 0.0)
        yield _gauge("shoal_raft_has_quorum", "1 if this manager's Raft group has quorum",
                     1.0 if st.get("has_quorum") else 0.0)
        leader = store.leader_addr()
        yield _gauge("shoal_raft_leader_info", "The leader's Raft address as this manager "
                     "knows it", 1.0 if leader else 0.0, {"leader": leader or ""})

    def _gossip(self) -> Iterator[Metric]:
        membership = self.m.sources.gossip()
        if membership is None:
            return
        counts = dict.fromkeys(GOSSIP_STATES, 0)
        for state in membership.view().values():
            counts[state] = counts.get(state, 0) + 1
        g = GaugeMetricFamily("shoal_gossip_members", "Gossip members by state, as this "
                              "node's member list sees them", labels=["state"])
        for state, n in sorted(counts.items()):
            g.add_metric([state], n)
        yield g
        stats = membership.stats()
        yield _gauge("shoal_gossip_health_score", "Lifeguard local health (0 = healthy)",
                     stats.get("health_score", 0))
        c = CounterMetricFamily("shoal_gossip_dropped", "Gossip packets or frames dropped, "
                                "by reason", labels=["reason"])
        for key, value in sorted(stats.items()):
            if key.startswith("drop."):
                c.add_metric([key[5:]], value)
        yield c

    def _tasks(self) -> Iterator[Metric]:
        store = self.m.sources.store()
        runtime = self.m.sources.runtime
        local = runtime.tasks()
        yield _gauge("shoal_node_tasks", "Tasks the runtime on this node knows", len(local))
        snap = store.snapshot() if store is not None else None
        if snap is not None:
            counts = {s.lower(): 0 for s in TaskState if s not in (TaskState.REMOVE,)}
            for t in snap.tasks.values():
                counts[t.status.state.lower()] = counts.get(t.status.state.lower(), 0) + 1
            g = GaugeMetricFamily("shoal_tasks", "Tasks of the cluster by observed state (this "
                                  "node's replica; the same on every node)", labels=["state"])
            for state, n in counts.items():
                g.add_metric([state], n)
            yield g
        labels = ["task", "service", "slot"]
        families: list[tuple[str, CounterMetricFamily | GaugeMetricFamily]] = [
            ("cpu_seconds", CounterMetricFamily(
                "shoal_task_cpu_seconds", "CPU time of a task running here (cgroups)",
                labels=labels)),
            ("memory_bytes", GaugeMetricFamily(
                "shoal_task_memory_bytes", "Working set of a task running here (cgroups: "
                "its memory charge less the inactive file cache)", labels=labels)),
            ("memory_peak_bytes", GaugeMetricFamily(
                "shoal_task_memory_peak_bytes", "Peak memory of a task running here",
                labels=labels)),
            ("pids", GaugeMetricFamily(
                "shoal_task_pids", "Processes and threads in a task running here",
                labels=labels)),
            ("net_rx_bytes", CounterMetricFamily(
                "shoal_task_network_receive_bytes", "Bytes received by a task running here "
                "(every interface of its own network namespace but lo)", labels=labels)),
            ("net_tx_bytes", CounterMetricFamily(
                "shoal_task_network_transmit_bytes", "Bytes sent by a task running here "
                "(every interface of its own network namespace but lo)", labels=labels)),
            ("block_read_bytes", CounterMetricFamily(
                "shoal_task_block_read_bytes", "Bytes a task running here read from block "
                "devices (cgroups or its processes' I/O counters)", labels=labels)),
            ("block_write_bytes", CounterMetricFamily(
                "shoal_task_block_write_bytes", "Bytes a task running here wrote to block "
                "devices (cgroups or its processes' I/O counters)",
                labels=labels)),
        ]
        for tid in sorted(local):
            usage = runtime.usage(tid)
            if usage is None:
                continue
            task = snap.tasks.get(tid) if snap is not None else None
            lv = [tid, task.service_name if task else "", str(task.slot) if task else ""]
            for attr, family in families:
                if (value := getattr(usage, attr)) is not None:
                    family.add_metric(lv, value)
        yield from (family for _, family in families)

    def _lb(self) -> Iterator[Metric]:
        stats = self.m._lb_stats
        if not stats:
            return
        services: dict[str, Any] = stats.get("services", {})
        per: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "connections": CounterMetricFamily("shoal_lb_connections", "Client connections "
                                               "and UDP flows accepted", labels=["service"]),
            "active": GaugeMetricFamily("shoal_lb_active_connections", "Connections and "
                                        "flows open now", labels=["service"]),
            "retries": CounterMetricFamily("shoal_lb_retries", "Connect attempts that moved "
                                           "on to another backend", labels=["service"]),
            "failed": CounterMetricFamily("shoal_lb_failed", "Connections that found no "
                                          "working backend", labels=["service"]),
            "udp_dropped": CounterMetricFamily("shoal_lb_udp_dropped", "UDP datagrams "
                                               "dropped", labels=["service"]),
        }
        be: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "total": CounterMetricFamily("shoal_lb_backend_connections", "Connections opened "
                                         "to a backend task", labels=["service", "task"]),
            "active": GaugeMetricFamily("shoal_lb_backend_active_connections", "Connections "
                                        "open to a backend task", labels=["service", "task"]),
            "failed": CounterMetricFamily("shoal_lb_backend_failed", "Failed connects to a "
                                          "backend task", labels=["service", "task"]),
        }
        for name, svc in sorted(services.items()):
            for key, fam in per.items():
                fam.add_metric([name], svc.get(key, 0))
            for task, ep in sorted(svc.get("endpoints", {}).items()):
                for key, fam in be.items():
                    fam.add_metric([name, task], ep.get(key, 0))
        nbytes = CounterMetricFamily("shoal_lb_bytes", "Bytes forwarded by this node's "
                                     "balancer (in: client → backend, out: backend → client)",
                                     labels=["service", "direction"])
        be_bytes = CounterMetricFamily("shoal_lb_backend_bytes", "Bytes forwarded to (in) and "
                                       "from (out) a backend task",
                                       labels=["service", "task", "direction"])
        for name, svc in sorted(services.items()):
            for direction in ("in", "out"):
                nbytes.add_metric([name, direction], svc.get(f"bytes_{direction}", 0))
                for task, ep in sorted(svc.get("endpoints", {}).items()):
                    be_bytes.add_metric([name, task, direction], ep.get(f"bytes_{direction}", 0))
        yield from per.values()
        yield from be.values()
        yield from (nbytes, be_bytes)
        yield _gauge("shoal_lb_worker_restarts", "Balancer worker restarts",
                     stats.get("restarts", 0))

    def _events(self) -> Iterator[Metric]:
        ev = self.m.sources.events
        yield _gauge("shoal_events_retained", "Events kept in this manager's ring",
                     len(ev))
        c = CounterMetricFamily("shoal_events_gaps", "Times this manager lost the log's "
                                "continuity (restart, snapshot install)")
        c.add_metric([], ev.gaps)
        yield c

    def _feed(self) -> Iterator[Metric]:
        stats = self.m.sources.feed()
        if stats is None:
            return
        for name, doc, values in (
                ("shoal_feed_replies", "State-feed replies sent to workers by kind "
                 "(commands, state, empty)", stats.replies),
                ("shoal_feed_bytes", "State-feed bytes sent to workers by kind", stats.bytes)):
            c = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in ("commands", "state", "empty"):
                c.add_metric([kind], values.get(kind, 0))
            yield c
        c = CounterMetricFamily("shoal_feed_encodes", "State-feed replies encoded (the rest "
                                "were shared from the reply cache)")
        c.add_metric([], stats.encodes)
        yield c
        c = CounterMetricFamily("shoal_feed_compressed", "State-feed replies sent compressed")
        c.add_metric([], stats.compressed)
        yield c
        c = CounterMetricFamily("shoal_feed_deferred", "Worker polls not answered at a commit "
                                "only other nodes needed (per-node filtering)")
        c.add_metric([], stats.deferred)
        yield c
        yield _gauge("shoal_feed_polls_held", "Worker polls held open now", stats.held)
        yield _gauge("shoal_feed_catchups_waiting", "Whole-state polls waiting for a slot",
                     stats.catchups_waiting)


    def _heartbeats(self) -> Iterator[Metric]:
        received = self.m.sources.heartbeats()
        if received is None:
            return
        c = CounterMetricFamily("shoal_heartbeats_received", "Heartbeats received from other "
                                "nodes (mostly the leader's: nodes beat to the leader alone)")
        c.add_metric([], received)
        yield c


async def serve_metrics(metrics: Metrics, request: web.Request) -> web.Response:
    body = await metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


__all__ = ["CONTENT_TYPE", "Metrics", "Sources", "serve_metrics"]
