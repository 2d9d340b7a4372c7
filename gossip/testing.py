"""Simulated clusters for tests and benchmarks: N members on one MemoryNetwork.

Owns the scaffolding to build, drive and observe a whole cluster inside one event loop (normally
a ``simloop.VirtualTimeLoop``): start and join members, record every event with its time, crash,
isolate, partition, and wait for conditions in simulated time. It must not reach into a
member's private state except through the public API (members(), stats, events).

Example (a sync test; simulated minutes pass in wall-clock seconds)::

    def test_something() -> None:
        async def scenario() -> None:
            cluster = SimCluster(50, Config.lan(), seed=1)
            await cluster.start()
            ...
            await cluster.shutdown()
        run_simulation(scenario())
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from .config import Config
from .errors import JoinError
from .events import MemberEvent
from .memberlist import Memberlist
from .memnet import MemoryNetwork
from .transport import Address
from .wire import MemberState

SIM_PORT = 7946


@dataclass(frozen=True, slots=True)
class Observation:
    """One event as recorded by SimCluster: ``observer`` saw ``event``."""

    observer: str
    event: MemberEvent

    @property
    def subject(self) -> str:
        return self.event.member.name

    @property
    def at(self) -> float:
        return self.event.at


class SimCluster:
    """N gossip members named m00, m01, … on an in-memory network.

    ``config`` is a template: name, addresses and (unless ``key`` is None) the key are set per
    member. ``key=None`` runs without encryption (``insecure_plaintext``), for tests that say so.
    """

    def __init__(
        self,
        n: int,
        config: Config,
        *,
        seed: int = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        latency: tuple[float, float] = (0.0002, 0.002),
        key: bytes | None = b"0123456789abcdef0123456789abcdef",
    ) -> None:
        self.n = n
        self.template = config
        self.key = key
        self.seed = seed
        self.net = MemoryNetwork(seed=seed, loss=loss, duplicate=duplicate, latency=latency)
        self.members: dict[str, Memberlist] = {}
        self.observations: list[Observation] = []
        self.crashed: set[str] = set()

    @staticmethod
    def name_of(i: int) -> str:
        return f"m{i:02d}"

    def address(self, name: str) -> Address:
        return (name, SIM_PORT)

    def config_for(self, name: str) -> Config:
        extra: dict[str, object] = {
            "name": name,
            "bind_addr": name,
            "bind_port": SIM_PORT,
            "advertise_addr": name,
        }
        if self.key is None:
            extra.update(secret_key=None, extra_keys=(), insecure_plaintext=True)
        else:
            extra.update(secret_key=self.key, insecure_plaintext=False)
        return self.template.replace(**extra)

    def add(self, name: str, meta: dict[str, object] | None = None) -> Memberlist:
        """Create (not start) a member; events are recorded from its very first one."""
        transport = self.net.transport(name, SIM_PORT, queue_size=self.template.packet_queue_size)
        rng = random.Random(f"{self.seed}/{name}")
        member = Memberlist(self.config_for(name), transport=transport, meta=meta, rng=rng)

        def record(event: MemberEvent, observer: str = name) -> None:
            self.observations.append(Observation(observer, event))

        member.subscribe(record)
        self.members[name] = member
        return member

    async def start(self, *, join: bool = True, converge_timeout: float = 120.0) -> float:
        """Start all N members, join them through m00 and wait until everyone sees everyone.

        Returns the simulated seconds convergence took.
        """
        loop = asyncio.get_running_loop()
        names = [self.name_of(i) for i in range(self.n)]
        for name in names:
            if name not in self.members:
                self.add(name)
        for name in names:
            await self.members[name].start()
        start = loop.time()
        if join and self.n > 1:
            seed = self.address(names[0])
            await asyncio.gather(*(self.join(nm, [seed]) for nm in names[1:]))
            await self.wait_until(self.converged, converge_timeout)
        return loop.time() - start

    async def join(self, name: str, seeds: list[Address], attempts: int = 20) -> int:
        """Join ``name`` through ``seeds``, retrying after a seeded random backoff: in a join
        storm the seed refuses push-pulls beyond its concurrent-stream limit, as a real one
        would, so joiners retry like the agent's join loop does."""
        member = self.members[name]
        rng = random.Random(f"{self.seed}/join/{name}")
        for attempt in range(1, attempts + 1):
            try:
                return await member.join(seeds)
            except JoinError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(rng.uniform(0.05, 0.25) * attempt)
        return 0

    def live(self) -> list[Memberlist]:
        return [m for name, m in self.members.items() if name not in self.crashed and m.running]

    def view(self, observer: str) -> dict[str, MemberState]:
        return {m.name: m.state for m in self.members[observer].members()}

    def converged(self) -> bool:
        """Every running member sees exactly the running members alive."""
        live = {m.name for m in self.live()}
        for member in self.live():
            seen = {m.name for m in member.members() if m.state == MemberState.ALIVE}
            if seen != live:
                return False
        return True

    def all_see(self, subject: str, state: MemberState) -> bool:
        """Every running member other than ``subject`` sees it in ``state``."""
        for member in self.live():
            if member.name == subject:
                continue
            seen = member.member(subject)
            if seen is None or seen.state != state:
                return False
        return True

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float, step: float = 0.05
    ) -> float:
        """Poll ``predicate`` every ``step`` simulated seconds; return the time it took.

        Raises TimeoutError after ``timeout`` simulated seconds.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not predicate():
            if loop.time() - start > timeout:
                raise TimeoutError(f"condition not met within {timeout} simulated seconds")
            await asyncio.sleep(step)
        return loop.time() - start

    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def crash(self, name: str) -> float:
        """Stop ``name`` abruptly (no leave): like kill -9. Returns the time of the crash."""
        self.crashed.add(name)
        await self.members[name].shutdown()
        return asyncio.get_running_loop().time()

    def events_about(
        self, subject: str, kind: str | None = None, since: float = 0.0
    ) -> list[Observation]:
        return [
            o
            for o in self.observations
            if o.subject == subject
            and o.at >= since
            and (kind is None or o.event.kind.value == kind)
            and o.observer != subject
        ]

    def events_of_kind(self, kind: str, since: float = 0.0) -> list[Observation]:
        return [
            o
            for o in self.observations
            if o.event.kind.value == kind and o.at >= since and o.observer != o.subject
        ]

    def total_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for member in self.members.values():
            for key, value in member.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    async def shutdown(self) -> None:
        for member in self.members.values():
            await member.shutdown()


def sim_key() -> bytes:
    """A fresh random 32-byte key."""
    return os.urandom(32)
