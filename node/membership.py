"""Gossip membership of a node: runs the SWIM member, tells the leader who is alive, and
rotates the cluster's gossip key.

Owns:

* ``Membership``: the agent's shoal.gossip Memberlist (name = node id, meta = role, hostname,
  API address and agent version), joining from seeds taken from the replicated node list, the
  liveness view the leader uses (``view()``: node id → "alive" | "suspect" | "dead" | "left";
  ``restarts()``: node id → deadline of a planned restart the node announced), a planned
  restart's announcement (``leave_for_restart``), and this node's gossip keyring at run time
  (``set_keys``; a watchdog that asks for the current keys when traffic arrives under a key
  this node does not hold);
* ``GossipControl``: the agent's gossip facade — the ``gossip`` section of ``shoal info``, the
  member detail of ``node inspect``, persisting the keyring in node.json
  (``NodeIdentity.gossip_key`` = primary, ``gossip_extra_keys`` = the others), and the
  three-phase key rotation behind ``shoal gossip rotate-key``.

Must not touch: the store (the leader's orchestrator turns the view into READY/DOWN; gossip keys
never go through Raft), the runtime, TLS (calls go through ``Security.call``).

Threads: the Memberlist runs on an event loop of its own, on a thread of its own
(``GossipThread``), so its probes and acks keep their timing whatever the agent's loop is
busy with (an API flood, a large state apply, a burst of task starts): a node that is slow
to answer its clients is not a node that is dead. Everything here that touches the member
list hops to that loop (``_in_gossip``: coroutines; ``_sync``: short calls that return a
copy); membership events hop back to the agent's loop. Only this module knows.

Flapping protection comes from the protocol itself: a node is declared dead only after a
suspicion period confirmed by independent members (Lifeguard), never on one missed ack.

Key rotation (``GossipControl.rotate_key``, run by the manager that receives the command)::

    new = 32 random bytes, made on the manager
    1. install  every READY node adds ``new`` as a decrypt-only key     (all must succeed,
                                                                          else rolled back)
    2. use      every READY node encrypts with ``new``; still reads the old key
    3. retire   after a short grace, every READY node drops every key but ``new``

Each phase is one mTLS call per node to ``POST /v1/cluster/gossip-keys`` (``Security.call``
with the node's own certificate name, so TLS proves it is that node); the receiving agent
accepts it only from a current manager's certificate, applies it to its running keyring and
saves node.json before answering. A phase starts only when every node acknowledged the
previous one, so at every instant every node can read what every other node sends: no
packet is dropped, nobody is suspected. A failure stops the rotation in a safe state
(phase 1 is rolled back; after a failed phase 2 or 3 every node still reads both keys) and
``rotate-key`` can simply be run again. Nodes that are DOWN are skipped and catch up when
they return: their traffic (or ours, to them) fails to decrypt, and the watchdog of the node
that sees ``drop.decrypt`` rise asks a manager for the current keys over mTLS
(``/v1/cluster/keys``, which returns the whole keyring), at most once per backoff period
(2 s doubling to 60 s while nothing changes, so junk packets cannot turn it into a flood).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import uvloop

from shoal.gossip import Config, JoinError, KeyringError, Memberlist, MemberState
from shoal.gossip.events import Member, MemberEvent
from shoal.gossip.keyring import fingerprint
from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import ApiError, BadRequest, KeyRotationFailed, NotInCluster, Unavailable
from shoal.node.security import Security
from shoal.raft.models import Node, NodeRole, NodeState

log = logging.getLogger("shoal.membership")

KEY_OPS = ("install", "use", "retire", "uninstall")
# How long the rotation waits between "use" and "retire": packets and push-pull frames sealed
# under the old key just before a node switched may still be queued at a receiver.
RETIRE_GRACE = 1.0
# Key refresh after decrypt failures: first wait, and the cap of its exponential backoff.
REFRESH_MIN_BACKOFF = 2.0
REFRESH_MAX_BACKOFF = 60.0
# Failed join attempts after which the join loop asks a manager for the current keys.
JOIN_FAILURES_BEFORE_REFRESH = 2
# Members a join pushes-pulls with (``join_seeds``): one answer is enough, the rest of the
# member list then arrives by gossip.
JOIN_SEEDS = 5
# Gossip metadata key of a planned restart: the seconds the stopping agent asks the others to
# wait for it (its AgentConfig.restart_grace), sent with its leave (``leave_for_restart``).
RESTART_META = "restart"
# Cap on an announced restart grace, seconds: a node cannot keep its tasks unowned for longer,
# whatever it announces.
MAX_RESTART_GRACE = 300.0


T = TypeVar("T")
# How long a call from the agent's loop waits for the gossip thread to run a short step
# (a view, a keyring change), seconds: it is microseconds of work; the bound only keeps a
# wedged gossip thread from hanging the agent.
SYNC_TIMEOUT = 5.0
# what the leader reads from gossip each pass: node id → state, → metadata, → restart deadline
LeaderInputs = tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, float]]
# The leader's inputs as published are used while younger than this, seconds (the gossip
# thread republishes every second while they are read): older = the gossip thread stopped.
INPUTS_STALE = 3.0
# The gossip thread stops publishing them when no leader read them for this long, seconds.
INPUTS_KEPT = 30.0
# what `node ls` / `node inspect` read: node id → state, → metadata; one member's detail
NodeViews = tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, Any] | None]


class GossipThread:
    """An event loop (uvloop) on a daemon thread of its own, for one Memberlist."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def start(self) -> None:
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the gossip loop; await its result from the caller's loop."""
        if not self.running:
            coro.close()
            raise RuntimeError("the gossip thread is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the short function ``fn(*args)`` on the gossip loop and return its result
        (directly when already there, or before the thread started)."""
        if not self.running or threading.current_thread() is self.thread:
            return fn(*args)
        return self._submit(fn, *args).result(SYNC_TIMEOUT)

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        """``call`` for the agent's loop: awaits the gossip thread instead of blocking the
        loop on it (under load a gossip thread busy with 100 members' packets kept a
        leader's loop from accepting connections for seconds)."""
        if not self.running or threading.current_thread() is self.thread:
            return fn(*args)
        return await asyncio.wait_for(asyncio.wrap_future(self._submit(fn, *args)),
                                      SYNC_TIMEOUT)

    def _submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """``fn(*args)`` scheduled on the gossip loop; its result or exception in the future."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def step() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(step)
        return fut

    def stop(self) -> None:
        if self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(SYNC_TIMEOUT)


class Membership:
    """One node's gossip member and its join loop and key watchdog."""

    def __init__(self, node_id: str, addr: str, port: int, key: bytes, meta: dict[str, Any],
                 config: Config | None = None,
                 on_change: Callable[[MemberEvent], None] | None = None, *,
                 extra_keys: Iterable[bytes] = (),
                 refresh_keys: Callable[[], Awaitable[bool]] | None = None) -> None:
        base = config or Config.lan()
        self.config = base.replace(name=node_id, bind_addr=addr, bind_port=port,
                                   advertise_addr=addr, secret_key=key,
                                   extra_keys=tuple(k for k in extra_keys if k != key))
        self.node_id = node_id
        self.port = port
        self.list = Memberlist(self.config, meta=meta)  # touched on its own thread only
        self.thread = GossipThread(f"gossip-{node_id[:8]}")
        self._on_change = on_change
        self._refresh_keys = refresh_keys
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh_lock = asyncio.Lock()
        self._next_refresh = 0.0
        self._refresh_backoff = REFRESH_MIN_BACKOFF
        self.refreshes = 0  # key refreshes that changed the keyring
        # The leader's gossip inputs, published by the gossip thread (``leader_inputs``):
        # rebuilt at every member event and every second while a leader reads them, read
        # from the agent's loop without a hop (a reference and a float: whole under the GIL).
        self._inputs: LeaderInputs = ({}, {}, {})
        self._inputs_at = -math.inf  # time.monotonic() of the last rebuild
        self._inputs_read = -math.inf  # time.monotonic() of the last read (agent's loop)

    async def start(self, seeds: Callable[[], Iterable[str]]) -> None:
        """Bind and start; join the cluster in the background (retrying) from ``seeds()``,
        a function returning "addr:port" of other nodes as currently known."""
        agent_loop = asyncio.get_running_loop()
        self.thread.start()
        try:
            await self.thread.run(self.list.start())
        except BaseException:
            self.thread.stop()
            raise
        on_change = self._on_change

        def hop(ev: MemberEvent) -> None:  # on the gossip thread → the agent's loop
            self._republish()  # (first: what the event wakes must see it)
            if on_change is not None:
                with contextlib.suppress(RuntimeError):  # the agent's loop is closed
                    agent_loop.call_soon_threadsafe(on_change, ev)
        self._unsubscribe = self.thread.call(self.list.subscribe, hop)
        self._tasks = [asyncio.create_task(self._join_loop(seeds), name="gossip-join"),
                       asyncio.create_task(self._key_watchdog(), name="gossip-keys")]

    async def _join_loop(self, seeds: Callable[[], Iterable[str]]) -> None:
        delay = 0.2
        failures = 0
        while True:
            candidates = [s for s in seeds() if s]
            if candidates:
                try:
                    n = await self.thread.run(self.list.join(candidates))
                    log.info("gossip: joined through %d of %d seeds", n, len(candidates))
                    return
                except JoinError as exc:
                    failures += 1
                    log.debug("gossip join failed (%s); retrying", exc)
                    if failures >= JOIN_FAILURES_BEFORE_REFRESH:
                        # maybe the cluster rotated its key while this node was away
                        await self.maybe_refresh_keys()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _key_watchdog(self) -> None:
        """Ask for the current keys when packets or frames fail to decrypt here.

        The gossip thread, which counts the failures, looks at the count once a second on
        its own loop and tells the agent's loop only when it grew: an idle node's loop is not
        woken for it (it asked across threads every second before: three wake-ups)."""
        agent_loop = asyncio.get_running_loop()
        grew = asyncio.Event()

        def tell() -> None:  # (gossip thread)
            with contextlib.suppress(RuntimeError):  # the agent's loop is closed
                agent_loop.call_soon_threadsafe(grew.set)

        async def watch() -> None:  # on the gossip thread's loop
            seen = int(self.list.stats.get("drop.decrypt", 0))
            while True:
                await asyncio.sleep(1.0)
                if self._publishing():  # still publishing: the inputs are current (every
                    self._inputs_at = time.monotonic()  # change is an event): say so
                drops = int(self.list.stats.get("drop.decrypt", 0))
                if drops > seen:
                    seen = drops
                    tell()

        watcher = asyncio.ensure_future(self.thread.run(watch()))
        watcher.add_done_callback(lambda f: f.cancelled() or f.exception())  # (retrieved)
        try:
            while True:
                await grew.wait()
                grew.clear()
                # a refresh not run now (its backoff) is tried again each second
                while self._refresh_keys is not None and not await self.maybe_refresh_keys():
                    await asyncio.sleep(1.0)
        finally:
            watcher.cancel()

    async def maybe_refresh_keys(self) -> bool:
        """Refresh the keyring through the agent's callback unless one ran recently; True if
        a refresh ran (whether or not it changed anything)."""
        refresh = self._refresh_keys
        loop = asyncio.get_running_loop()
        if refresh is None or loop.time() < self._next_refresh or self._refresh_lock.locked():
            return False
        async with self._refresh_lock:
            try:
                changed = await refresh()
            except (ApiError, OSError, KeyringError) as exc:
                log.debug("gossip key refresh failed: %s", exc)
                changed = False
            except Exception:  # a bug must not end the watchdog or the join loop
                log.exception("gossip key refresh failed")
                changed = False
            if changed:
                self.refreshes += 1
                self._refresh_backoff = REFRESH_MIN_BACKOFF
            else:
                self._refresh_backoff = min(self._refresh_backoff * 2, REFRESH_MAX_BACKOFF)
            self._next_refresh = loop.time() + self._refresh_backoff
        return True

    # ---------------------------------------------------------------- keys
    def installed_keys(self) -> list[bytes]:
        """Installed gossip keys, primary first."""
        def keys() -> list[bytes]:
            ring = self.list.keyring
            return ring.keys() if ring is not None else []
        return self.thread.call(keys)

    def fingerprints(self) -> list[str]:
        def fps() -> list[str]:
            ring = self.list.keyring
            return ring.fingerprints() if ring is not None else []
        return self.thread.call(fps)

    def set_keys(self, keys: list[bytes]) -> bool:
        """Make the running keyring exactly ``keys`` (first = primary); True if it changed."""
        return self.thread.call(self._set_keys, keys)

    def _set_keys(self, keys: list[bytes]) -> bool:
        ring = self.list.keyring
        if ring is None:
            raise KeyringError("this member runs without encryption")
        return ring.set_keys(keys)

    def apply_key_op(self, op: str, key: bytes) -> None:
        """One rotation step on the running keyring (see the module docstring)."""
        self.thread.call(self._apply_key_op, op, key)

    def _apply_key_op(self, op: str, key: bytes) -> None:
        ring = self.list.keyring
        if ring is None:
            raise KeyringError("this member runs without encryption")
        if op == "install":
            ring.install_key(key)
        elif op == "use":
            ring.install_key(key)  # idempotent; a node that missed "install" still works
            ring.use_key(key)
        elif op == "retire":
            ring.set_keys([key])
        elif op == "uninstall":  # roll back an install; never the key in use
            if ring.primary != key:
                with contextlib.suppress(KeyringError):
                    ring.remove_key(key)
        else:
            raise KeyringError(f"unknown key operation {op!r}")

    # ---------------------------------------------------------------- views
    @property
    def running(self) -> bool:
        """Read directly, not on the gossip thread: one string attribute, which the GIL
        reads whole (a round trip to the gossip thread cost the leader one blocking hop
        per pass)."""
        return self.list.running

    def stats(self) -> dict[str, int]:
        """A copy of the member list's counters (shoal.gossip's ``stats``)."""
        return self.thread.call(lambda: dict(self.list.stats))

    def health_score(self) -> int:
        return self.thread.call(lambda: self.list.health_score)

    async def take_probe_rtts(self) -> list[float]:
        return await self.thread.ask(lambda: list(self.list.take_probe_rtts()))

    def view(self) -> dict[str, str]:
        """Node id → gossip state of every member this node has heard of."""
        return self.thread.call(lambda: {m.name: STATE_NAMES[m.state]
                                         for m in self.list.members(include_gone=True)})

    def metas(self) -> dict[str, dict[str, Any]]:
        """Node id → the gossip metadata it last announced, for every member this node has
        heard of (gone ones included: a down node's last word still counts)."""
        return self.thread.call(lambda: {m.name: dict(m.meta)
                                         for m in self.list.members(include_gone=True)})

    def state_of(self, node_id: str) -> str | None:
        def state() -> str | None:
            m = self.list.member(node_id)
            return None if m is None else STATE_NAMES[m.state]
        return self.thread.call(state)

    def member_detail(self, node_id: str) -> dict[str, Any] | None:
        """What this node's member list says about ``node_id`` (None if never heard of)."""
        def detail() -> dict[str, Any] | None:
            m = self.list.member(node_id)
            return None if m is None else member_dict(m)
        return self.thread.call(detail)

    async def node_views(self, node_id: str | None = None) -> NodeViews:
        """``view``, ``metas`` and (with ``node_id``) ``member_detail`` in one awaited round
        trip to the gossip thread (`node ls`, `node inspect`, the dashboard)."""
        def read() -> NodeViews:
            members = self.list.members(include_gone=True)
            m = self.list.member(node_id) if node_id is not None else None
            return ({x.name: STATE_NAMES[x.state] for x in members},
                    {x.name: dict(x.meta) for x in members},
                    None if m is None else member_dict(m))
        return await self.thread.ask(read)

    def restarts(self) -> dict[str, float]:
        """Node id → deadline (``time.monotonic()``) of the planned restart of every member
        that announced one (``leave_for_restart``) and is gone (dead or left) since: the
        moment this node saw it go plus the announced grace (at most MAX_RESTART_GRACE)."""
        return self.thread.call(self._restarts)

    async def leader_inputs(self) -> LeaderInputs:
        """``view``, ``metas`` and ``restarts``, which the leader reads every pass: as the
        gossip thread last published them (at the last member event, at most a second ago:
        no hop, no wake-up of the gossip thread), else — the first read, or a gossip thread
        that stopped publishing (wedged: TimeoutError after SYNC_TIMEOUT) — asked of the
        gossip thread, awaited (the leader's loop goes on serving meanwhile). The dicts are
        shared: read, never change them."""
        now = time.monotonic()
        self._inputs_read = now
        if now - self._inputs_at < INPUTS_STALE:
            return self._inputs
        return await self.thread.ask(self._publish_inputs)

    def _publishing(self) -> bool:
        """(gossip thread) Whether a leader read the inputs lately: only then are they kept."""
        return time.monotonic() - self._inputs_read < INPUTS_KEPT

    def _republish(self) -> None:
        """(gossip thread, at a member event) Publish the inputs again if a leader reads
        them; else mark them stale (a read after a quiet spell asks). Never raises: the
        event must still reach the agent."""
        if not self._publishing():
            self._inputs_at = -math.inf
            return
        try:
            self._publish_inputs()
        except Exception:
            self._inputs_at = -math.inf
            log.exception("gossip: cannot publish the leader's inputs")

    def _publish_inputs(self) -> LeaderInputs:
        """(gossip thread) Build the leader's inputs from the member list and publish them."""
        members = self.list.members(include_gone=True)
        inputs = ({m.name: STATE_NAMES[m.state] for m in members},
                  {m.name: dict(m.meta) for m in members}, self._restarts(members))
        self._inputs = inputs
        self._inputs_at = time.monotonic()  # (after the inputs: a fresh stamp, fresh inputs)
        return inputs

    def _restarts(self, members: Iterable[Member] | None = None) -> dict[str, float]:
        loop_now = asyncio.get_running_loop().time()
        mono = time.monotonic()
        out: dict[str, float] = {}
        for m in self.list.members(include_gone=True) if members is None else members:
            grace = m.meta.get(RESTART_META)
            if m.state in (MemberState.DEAD, MemberState.LEFT) and not isinstance(
                    grace, bool) and isinstance(grace, (int, float)) and grace > 0:
                out[m.name] = mono - (loop_now - m.state_since) + min(float(grace),
                                                                      MAX_RESTART_GRACE)
        return out

    def update_meta(self, meta: dict[str, Any]) -> None:
        self.thread.call(self.list.update_meta, meta)

    def set_confirm_suspicions(self, on: bool) -> None:
        """Whether this member probes at once a member another one suspects (gossip's
        Config.confirm_suspicions): on for managers, so every suspicion gets its independent
        confirmations within a probe period."""
        self.thread.call(setattr, self.list, "confirm_suspicions", on)

    def confirms_suspicions(self) -> bool:
        return self.thread.call(lambda: self.list.confirm_suspicions)

    async def leave_for_restart(self, grace: float, timeout: float) -> None:
        """Announce a planned restart: this node's metadata gains ``restart: grace`` and it
        leaves (the others see it "left", not dead, and keep that metadata), within
        ``timeout`` seconds. ``close(leave=False)`` afterwards."""
        if not self.thread.running or not self.running:
            return
        meta = self.thread.call(lambda: dict(self.list.local_member.meta,
                                             **{RESTART_META: float(grace)}))
        await self.thread.run(self.list.leave(timeout=timeout, meta=meta))

    async def close(self, leave: bool) -> None:
        """Stop gossiping; ``leave`` announces a graceful leave first (not a failure)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._unsubscribe is not None:
            with contextlib.suppress(Exception):
                self.thread.call(self._unsubscribe)
            self._unsubscribe = None
        if not self.thread.running:
            return
        try:
            if leave:
                with contextlib.suppress(Exception):
                    await self.thread.run(self.list.leave(timeout=1.0))
            await self.thread.run(self.list.shutdown())
        finally:
            self.thread.stop()


STATE_NAMES = {
    MemberState.ALIVE: "alive",
    MemberState.SUSPECT: "suspect",
    MemberState.DEAD: "dead",
    MemberState.LEFT: "left",
}


def join_seeds(nodes: Iterable[Node], me: str, k: int = JOIN_SEEDS,
               pick: Callable[[list[Node], int], list[Node]] | None = None) -> list[str]:
    """The gossip addresses a join (or rejoin) pushes-pulls with: ``k`` of the cluster's
    other nodes at random, at least one of them a manager when there is one.

    Not all of them: memberlist's join pushes-pulls with every seed it is given, a full
    member list each way. Joining through every node made a 100-worker join storm cost
    ~100 x 100 exchanges of 100-member lists on 2 cores (load 40 → 130 as the joiners came
    out of their catch-up together; elections followed). One answer suffices — the rest
    arrives by gossip and the next push-pull; the join loop asks again, with a new draw,
    if none answers. Consul and Swarm join through a handful of addresses as well."""
    pick = pick or (lambda xs, n: random.sample(xs, n))
    others = [n for n in nodes if n.id != me]
    managers = [n for n in others if n.role is NodeRole.MANAGER]
    chosen = pick(managers, 1) if managers else []
    rest = [n for n in others if n not in chosen]
    chosen += pick(rest, min(len(rest), max(0, k - len(chosen))))
    return [f"{n.addr}:{n.gossip_port}" for n in chosen]


def member_dict(m: Member) -> dict[str, Any]:
    """JSON view of one member; ``state_since`` converted from loop time to Unix time."""
    since = m.state_since
    with contextlib.suppress(RuntimeError):
        since = time.time() - (asyncio.get_running_loop().time() - m.state_since)
    return {"state": STATE_NAMES[m.state], "incarnation": m.incarnation,
            "state_since": round(since, 3), "addr": f"{m.addr}:{m.port}"}


class GossipControl:
    """The agent's gossip facade: info, member detail, keyring persistence and rotation."""

    def __init__(self, ctx: NodeContext, security: Security,
                 membership: Callable[[], Membership | None]) -> None:
        self.ctx = ctx  # identity, config, the state source (shoal.node.context)
        self.security = security
        self._current = membership  # this node's running Membership, if any
        self._rotation = asyncio.Lock()
        self.rotations = 0

    def _membership(self) -> Membership:
        m = self._current()
        if m is None or not m.running:
            raise Unavailable("gossip is not running on this node (not in a cluster, or it "
                              "could not bind its port: see the agent log)")
        return m

    # ---------------------------------------------------------------- read-only views
    def info(self) -> dict[str, Any] | None:
        """The ``gossip`` section of ``shoal info``: membership counts, health, keys, stats."""
        m = self._current()
        if m is None or not m.running:
            return None
        view = m.view()
        states = Counter(view.values())
        fps = m.fingerprints()
        return {
            "addr": f"{m.config.advertise_addr}:{m.port}",
            "preset": self.ctx.config.gossip_preset,
            "probe_interval": m.config.probe_interval,
            "confirms_suspicions": m.confirms_suspicions(),
            "health_score": m.health_score(),
            "members": {s: states.get(s, 0) for s in STATE_NAMES.values()},
            "view": view,
            "keys": {"primary": fps[0] if fps else None, "installed": fps,
                     "refreshes": m.refreshes, "rotations": self.rotations},
            "stats": dict(sorted(m.stats().items())),
        }

    async def node_views(self, node_id: str | None = None) -> NodeViews:
        """node id → gossip state, → last announced metadata, and ``node_id``'s member
        detail, from this node's member list (({}, {}, None) while gossip is down)."""
        m = self._current()
        if m is None or not m.running:
            return {}, {}, None
        try:
            return await m.node_views(node_id)
        except TimeoutError:  # a wedged gossip thread: show the records without gossip
            return {}, {}, None

    def restarts(self) -> dict[str, float]:
        """Planned restarts in progress, for the leader's liveness (``Membership.restarts``)."""
        m = self._current()
        return m.restarts() if m is not None and m.running else {}

    async def leader_inputs(self) -> LeaderInputs:
        """``view``, ``metas``, ``restarts`` at once (``Membership.leader_inputs``)."""
        m = self._current()
        return await m.leader_inputs() if m is not None and m.running else ({}, {}, {})

    # ---------------------------------------------------------------- keyring persistence
    def _persist(self, m: Membership) -> None:
        ident = self.ctx.identity
        keys = m.installed_keys()
        if ident is None or not keys:
            return
        ident.gossip_key, ident.gossip_extra_keys = keys[0], keys[1:]
        ident.save(self.ctx.data_dir)

    def member_keys(self) -> list[str]:
        """The whole keyring (hex, primary first) for ``/v1/cluster/keys`` (mTLS members)."""
        m = self._current()
        ident = self.ctx.identity
        if m is not None and m.installed_keys():
            return [k.hex() for k in m.installed_keys()]
        if ident is None:
            return []
        return [k.hex() for k in [ident.gossip_key, *ident.gossip_extra_keys] if k]

    def apply_key_op(self, peer: pki.CertInfo | None, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/cluster/gossip-keys`` from a manager: one rotation step, persisted."""
        self.security.authorize(peer, manager=True)
        op, key = parse_key_op(body)
        m = self._membership()
        try:
            m.apply_key_op(op, key)
        except KeyringError as exc:
            raise BadRequest(str(exc), "op") from exc
        self._persist(m)
        log.info("gossip key %s: %s (keys now %s)", op, fingerprint(key),
                 ", ".join(fingerprint(k) for k in m.installed_keys()))
        return {"op": op, "key": fingerprint(key),
                "keys": [fingerprint(k) for k in m.installed_keys()]}

    async def refresh_keys(self) -> bool:
        """Fetch the cluster's keyring from a manager over mTLS (leader first) and adopt it;
        True if this node's keyring changed."""
        m = self._current()
        ident, store = self.ctx.identity, self.ctx.store
        if m is None or ident is None or store is None or self.security.client_ctx is None:
            return False
        leader = (store.leader_addr() or "").split(":")[0]
        managers = sorted((n for n in store.snapshot().nodes.values()
                           if n.role is NodeRole.MANAGER and n.id != ident.node_id),
                          key=lambda n: (n.addr != leader, n.id))
        for node in managers:
            try:
                reply = await self.security.call(node.api_addr, "/v1/cluster/keys", {},
                                                 timeout=5.0)
                raw = reply.get("gossip_keys") or [reply["gossip_key"]]
                keys = [bytes.fromhex(str(k)) for k in raw]
            except (ApiError, KeyError, ValueError, TypeError) as exc:
                log.debug("gossip key refresh from %s failed: %s", node.hostname, exc)
                continue
            if not m.set_keys(keys):
                return False
            self._persist(m)
            log.warning("gossip keys refreshed from %s (a rotation happened while this node "
                        "was away): keys now %s", node.hostname,
                        ", ".join(fingerprint(k) for k in keys))
            return True
        return False

    # ---------------------------------------------------------------- rotation
    async def rotate_key(self) -> dict[str, Any]:
        """Roll a new gossip key through the cluster: install → use → retire (module doc)."""
        store = self.ctx.require_manager()
        m = self._membership()
        if self._rotation.locked():
            raise KeyRotationFailed("a key rotation is already running on this manager")
        async with self._rotation:
            nodes = sorted(store.snapshot().nodes.values(), key=lambda n: (n.hostname, n.id))
            targets = [n for n in nodes if n.state is NodeState.READY]
            skipped = [n for n in nodes if n.state is not NodeState.READY]
            old = [fingerprint(k) for k in m.installed_keys()]
            new = secrets.token_bytes(32)
            started = time.monotonic()
            failed = await self._push_all(targets, "install", new)
            if failed:
                await self._push_all([n for n in targets if n.id not in failed], "uninstall",
                                     new)
                raise KeyRotationFailed(
                    f"key rotation stopped at phase 1 (install): {_names(failed)}; it was "
                    "rolled back, nothing changed. Retry when those nodes are reachable "
                    "(or remove them).")
            failed = await self._push_all(targets, "use", new)
            if failed:
                raise KeyRotationFailed(
                    f"key rotation stopped at phase 2 (use): {_names(failed)}; every node "
                    "still accepts the old key, so gossip is unaffected. Run `shoal gossip "
                    "rotate-key` again once they are reachable.")
            await asyncio.sleep(max(RETIRE_GRACE, 2 * m.config.probe_interval))
            failed = await self._push_all(targets, "retire", new)
            if failed:
                raise KeyRotationFailed(
                    f"key rotation stopped at phase 3 (retire): {_names(failed)} still accept "
                    "the old key (everyone else uses the new one). Run `shoal gossip "
                    "rotate-key` again to clean up.")
            self.rotations += 1
            log.info("gossip key rotated to %s on %d nodes in %.2f s (skipped %d down)",
                     fingerprint(new), len(targets), time.monotonic() - started, len(skipped))
            return {"key": fingerprint(new), "old_keys": [k for k in old
                                                          if k != fingerprint(new)],
                    "nodes": [n.hostname for n in targets],
                    "skipped": [n.hostname for n in skipped],
                    "seconds": round(time.monotonic() - started, 3)}

    async def _push_all(self, nodes: list[Node], op: str, key: bytes) -> dict[str, str]:
        """Apply ``op`` on every node concurrently; node id → error for those that failed."""
        results = await asyncio.gather(*(self._push(n, op, key) for n in nodes),
                                       return_exceptions=True)
        failed: dict[str, str] = {}
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                msg = result.message if isinstance(result, ApiError) else repr(result)
                failed[node.id] = f"{node.hostname}: {msg}"
        return failed

    async def _push(self, node: Node, op: str, key: bytes) -> None:
        ident = self.ctx.identity
        if ident is None:
            raise NotInCluster("this node is not part of a cluster")
        if node.id == ident.node_id:
            m = self._membership()
            m.apply_key_op(op, key)
            self._persist(m)
            return
        # TLS checks the server's certificate names *this* node, not just any member
        await self.security.call(node.api_addr, "/v1/cluster/gossip-keys",
                                 {"op": op, "key": key.hex()},
                                 server_hostname=pki.node_hostname(node.id), timeout=5.0)


def parse_key_op(body: dict[str, Any]) -> tuple[str, bytes]:
    """Validate ``{"op": ..., "key": hex}`` (BadRequest naming the field)."""
    op = body.get("op")
    if op not in KEY_OPS:
        raise BadRequest(f"op must be one of {', '.join(KEY_OPS)}", "op")
    try:
        key = bytes.fromhex(str(body.get("key", "")))
    except ValueError:
        raise BadRequest("key must be hex", "key") from None
    if len(key) not in (16, 24, 32):
        raise BadRequest("key must be 16, 24 or 32 bytes", "key")
    return str(op), key


def _names(failed: dict[str, str]) -> str:
    return "; ".join(failed.values())
