"""Whole-cluster properties of shoal.gossip on the in-memory network, in virtual time.

Each test runs a cluster inside a VirtualTimeLoop: simulated minutes take wall-clock seconds and
every run with the same seed is identical. Times asserted are simulated seconds, computed from
the Config, never wall-clock.
"""

from __future__ import annotations

import asyncio

import pytest

from shoal.gossip import (
    Config,
    ConfigError,
    JoinError,
    MemberEvent,
    Memberlist,
    MemberState,
    StateError,
)
from shoal.gossip.simloop import run_simulation
from shoal.gossip.testing import SimCluster

ALIVE, SUSPECT = MemberState.ALIVE, MemberState.SUSPECT
DEAD, LEFT = MemberState.DEAD, MemberState.LEFT


def test_crashed_member_is_declared_dead_by_all_within_the_configured_bound() -> None:
    n = 50
    cfg = Config.lan()

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=1)
        await cluster.start()
        await cluster.run_for(20)
        crashed_at = await cluster.crash("m17")
        bound = cfg.detection_bound(n)
        took = await cluster.wait_until(lambda: cluster.all_see("m17", DEAD), timeout=bound)
        assert took <= bound
        # nobody else was harmed, and every survivor reported the death exactly once
        dead = cluster.events_of_kind("dead")
        assert {o.subject for o in dead} == {"m17"}
        assert sorted(o.observer for o in dead) == sorted(m.name for m in cluster.live())
        assert all(o.at >= crashed_at for o in dead)
        await cluster.shutdown()

    run_simulation(scenario())


def test_ten_percent_packet_loss_for_900_probe_periods_causes_no_false_death() -> None:
    """3 simulated minutes = 900 probe periods per member (the 10-minute, 100-member run
    at 5 % loss is in bench/gossip_bench.py: too slow for the unit suite)."""
    n = 50
    cfg = Config.lan()

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=2)
        await cluster.start()
        cluster.net.loss = 0.10
        start = asyncio.get_running_loop().time()
        await cluster.run_for(900 * cfg.probe_interval)
        assert cluster.events_of_kind("dead", since=start) == []
        stats = cluster.total_stats()
        # the loss was real: probes failed, members were suspected and refuted
        assert stats["probes_failed"] > 0
        assert stats["refutes"] > 0
        assert cluster.events_of_kind("suspect", since=start)
        assert cluster.net.stats["packets_lost"] > 0.08 * cluster.net.stats["packets_sent"]
        assert stats.get("drop.internal", 0) == 0
        cluster.net.loss = 0.0
        await cluster.wait_until(cluster.converged, timeout=60)
        await cluster.shutdown()

    run_simulation(scenario())


def test_refuted_suspicion_never_becomes_dead() -> None:
    n = 50
    cfg = Config.lan()
    low, high = cfg.suspicion_timeouts(n)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=3)
        await cluster.start()
        await cluster.run_for(10)
        victim = cluster.members["m05"]
        start = asyncio.get_running_loop().time()
        # Cut it off for half the minimum suspicion timeout: its probes fail, it is suspected.
        cluster.net.isolate(victim.address)
        await cluster.run_for(low / 2)
        cluster.net.restore(victim.address)
        await cluster.run_for(2 * high)
        suspected = cluster.events_about("m05", "suspect", since=start)
        assert suspected, "the isolation should have caused a suspicion"
        assert cluster.events_of_kind("dead", since=start) == []
        assert cluster.events_about("m05", "alive-again", since=start)  # the refutation
        assert victim.local_member.incarnation > 1
        assert victim.stats["refutes"] >= 1
        assert cluster.converged()
        await cluster.shutdown()

    run_simulation(scenario())


def test_isolated_member_lowers_its_own_health_instead_of_killing_peers() -> None:
    n = 30
    cfg = Config.lan()
    low, high = cfg.suspicion_timeouts(n)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=4)
        await cluster.start()
        victim = cluster.members["m07"]
        start = asyncio.get_running_loop().time()
        cluster.net.isolate(victim.address)
        # longer than the others' minimum timeout (they declare it dead), shorter than the
        # maximum it would need alone (it gets no confirmations, so it kills nobody)
        await cluster.run_for((low + high) / 2)
        assert victim.health_score > 0  # Lifeguard: it slowed itself down
        assert cluster.all_see("m07", DEAD)
        cluster.net.restore(victim.address)
        await cluster.wait_until(lambda: cluster.all_see("m07", ALIVE), timeout=120)
        dead = cluster.events_of_kind("dead", since=start)
        assert {o.subject for o in dead} == {"m07"}
        assert all(o.observer != "m07" for o in dead)
        assert cluster.events_about("m07", "alive-again", since=start)  # alive again everywhere
        await cluster.wait_until(cluster.converged, timeout=60)
        await cluster.wait_until(lambda: victim.health_score == 0, timeout=60)
        await cluster.shutdown()

    run_simulation(scenario())


def test_partition_heals_and_membership_converges() -> None:
    n = 50
    cfg = Config.lan(reconnect_interval=10.0)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=5)
        await cluster.start()
        names = sorted(cluster.members)
        side_a = [cluster.address(x) for x in names[:30]]
        side_b = [cluster.address(x) for x in names[30:]]
        cluster.net.partition(side_a, side_b)
        _, high = cfg.suspicion_timeouts(n)
        await cluster.run_for(high + 20)
        # each side has declared the other dead
        for name in (names[0], names[-1]):
            view = cluster.view(name)
            own = names[:30] if name in names[:30] else names[30:]
            assert all(view[x] == ALIVE for x in own)
            assert all(view[x] == DEAD for x in names if x not in own)
        healed_at = asyncio.get_running_loop().time()
        cluster.net.heal()
        took = await cluster.wait_until(cluster.converged, timeout=180)
        assert took < 180
        assert len(cluster.events_of_kind("alive-again", since=healed_at)) >= 2 * 30 * 20
        await cluster.shutdown()

    run_simulation(scenario())


def test_left_member_is_reported_left_and_never_dead() -> None:
    n = 20
    cfg = Config.lan()
    _, high = cfg.suspicion_timeouts(n)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=6)
        await cluster.start()
        leaver = cluster.members["m09"]
        start = asyncio.get_running_loop().time()
        await leaver.leave()
        await leaver.shutdown()
        cluster.crashed.add("m09")
        await cluster.wait_until(lambda: cluster.all_see("m09", LEFT), timeout=10)
        await cluster.run_for(2 * high)
        assert cluster.all_see("m09", LEFT)
        assert cluster.events_about("m09", "dead", since=start) == []
        assert cluster.events_about("m09", "suspect", since=start) == []
        assert len(cluster.events_about("m09", "left", since=start)) == n - 1
        await cluster.shutdown()

    run_simulation(scenario())


def test_a_leave_with_metadata_leaves_every_member_with_that_metadata() -> None:
    """leave(meta=...) (a planned restart): every other member sees the member left — never
    dead or suspect — and keeps the announced metadata, within the leave timeout."""
    n = 20
    cfg = Config.lan()
    _, high = cfg.suspicion_timeouts(n)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=16)
        for i in range(n):
            cluster.add(cluster.name_of(i), meta={"role": "manager"})
        await cluster.start()
        leaver = cluster.members["m04"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        await leaver.leave(timeout=1.0, meta={"role": "manager", "restart": 30.0})
        assert loop.time() - start <= 1.0 + 1e-6
        await leaver.shutdown()
        cluster.crashed.add("m04")
        await cluster.wait_until(lambda: cluster.all_see("m04", LEFT), timeout=2)
        for member in cluster.live():
            seen = member.member("m04")
            assert seen is not None and seen.meta == {"role": "manager", "restart": 30.0}
        await cluster.run_for(2 * high)
        assert cluster.events_about("m04", "dead", since=start) == []
        assert cluster.events_about("m04", "suspect", since=start) == []
        await cluster.shutdown()

    run_simulation(scenario())


@pytest.mark.parametrize("seed", range(8))
def test_a_leave_with_metadata_reaches_every_member_before_the_leave_overtakes_it(
        seed: int) -> None:
    """The restart metadata of a planned stop must reach every member, the leader among
    them, even when gossip is slow to spread it (a starved gossip thread; here a long gossip
    interval): the leave that follows replaces a member's queued broadcast about the leaver,
    so a member the update had not reached by then never got it — and the leader then took
    the restarting node for gone and replaced its tasks. The update goes to every member
    directly before the leave does."""
    n = 5
    cfg = Config.lan().replace(gossip_interval=5.0)

    async def scenario() -> None:
        cluster = SimCluster(n, cfg, seed=seed)
        await cluster.start()
        leaver = cluster.members["m03"]
        await cluster.run_for(1.0)
        await leaver.leave(timeout=1.0, meta={"restart": 30.0})
        await leaver.shutdown()
        cluster.crashed.add("m03")
        await cluster.wait_until(lambda: cluster.all_see("m03", LEFT), timeout=10)
        missing = [m.name for m in cluster.live()
                   if (seen := m.member("m03")) is None or seen.meta != {"restart": 30.0}]
        assert missing == []
        await cluster.shutdown()

    run_simulation(scenario())


def test_metadata_travels_and_updates_reach_everyone() -> None:
    async def scenario() -> None:
        cluster = SimCluster(12, Config.lan(), seed=7)
        for i in range(12):
            name = cluster.name_of(i)
            cluster.add(name, meta={"role": "worker", "api": f"{name}:4242", "version": "0.1"})
        await cluster.start()
        for member in cluster.live():
            seen = {m.name: m.meta["api"] for m in member.members()}
            assert seen == {x: f"{x}:4242" for x in cluster.members}
        target = cluster.members["m03"]
        before = target.local_member.incarnation
        start = asyncio.get_running_loop().time()
        target.update_meta({"role": "manager", "api": "m03:4242", "labels": {"zone": "b"}})

        def everyone_updated() -> bool:
            return all(
                (x := m.member("m03")) is not None and x.meta.get("role") == "manager"
                for m in cluster.live()
            )

        await cluster.wait_until(everyone_updated, timeout=10)
        updates = cluster.events_about("m03", "update", since=start)
        assert len(updates) == 11
        assert all(o.event.member.incarnation == before + 1 for o in updates)
        await cluster.shutdown()

    run_simulation(scenario())


def test_restarted_member_with_the_same_name_comes_back_alive() -> None:
    cfg = Config.lan()

    async def scenario() -> None:
        cluster = SimCluster(10, cfg, seed=8)
        await cluster.start()
        await cluster.crash("m04")
        await cluster.wait_until(lambda: cluster.all_see("m04", DEAD), timeout=60)
        start = asyncio.get_running_loop().time()
        # a fresh process: same name and address, incarnation starts over at 1
        cluster.crashed.discard("m04")
        reborn = cluster.add("m04")
        await reborn.start()
        await reborn.join([cluster.address("m00")])
        await cluster.wait_until(cluster.converged, timeout=60)
        assert reborn.local_member.incarnation > 1  # it outbid its own death
        assert len(cluster.events_about("m04", "alive-again", since=start)) == 9
        await cluster.shutdown()

    run_simulation(scenario())


def test_duplicated_and_reordered_packets_do_no_harm() -> None:
    async def scenario() -> None:
        cluster = SimCluster(20, Config.lan(), seed=9, duplicate=0.2, latency=(0.0001, 0.05))
        await cluster.start()
        await cluster.run_for(180)
        assert cluster.events_of_kind("suspect") == []
        assert cluster.net.stats["packets_duplicated"] > 0
        await cluster.shutdown()

    run_simulation(scenario())


def test_event_stream_delivers_the_membership_story_in_order() -> None:
    cfg = Config.lan()

    async def scenario() -> list[tuple[str, str]]:
        cluster = SimCluster(5, cfg, seed=10)
        observer = cluster.add("m00")
        stream = observer.events()
        await cluster.start()
        await cluster.crash("m02")
        await cluster.wait_until(lambda: cluster.all_see("m02", DEAD), timeout=60)
        await cluster.members["m03"].leave()
        await cluster.wait_until(lambda: cluster.all_see("m03", LEFT), timeout=10)
        await observer.shutdown()
        story = [(ev.kind.value, ev.member.name) async for ev in stream]
        await cluster.shutdown()
        return story

    story = run_simulation(scenario())
    assert story[0] == ("join", "m00")
    assert sorted(story[1:5]) == [("join", f"m0{i}") for i in range(1, 5)]
    assert story[5:] == [("suspect", "m02"), ("dead", "m02"), ("left", "m03")]


def test_member_lifecycle_errors_are_typed() -> None:
    async def scenario() -> None:
        cluster = SimCluster(1, Config.lan(), seed=11)
        member: Memberlist = cluster.add("m00")
        with pytest.raises(StateError):
            member.update_meta({"a": 1})
        await member.start()
        with pytest.raises(StateError):
            await member.start()
        with pytest.raises(ConfigError):
            member.update_meta({"big": "x" * 1000})
        with pytest.raises(ConfigError):
            member.update_meta({"bad": object()})
        with pytest.raises(JoinError) as info:
            await member.join([("nowhere", 1)])
        assert ("nowhere", 1) in info.value.causes
        assert await member.join([member.address]) == 0  # joining yourself is a no-op
        await member.shutdown()
        await member.shutdown()  # idempotent
        with pytest.raises(StateError):
            await member.join([("m01", 7946)])

    run_simulation(scenario())


def test_suspect_that_still_answers_probes_is_never_executed() -> None:
    """Last-chance probe: A never hears C's refutation (a filter eats every alive message about
    C on its way to A), yet C answers A's probes, so A's expired suspicion is re-armed instead
    of executed. Runs without encryption (key=None) so the filter can read the packets."""
    from shoal.gossip import wire

    cfg = Config.lan(push_pull_interval=0.0, reconnect_interval=0.0)

    def carries_alive_about_c(data: bytes) -> bool:
        try:
            _, msgs = wire.decode_payload(data[1:])
        except Exception:
            return False
        return any(isinstance(m, wire.Alive) and m.node == "m02" for m in msgs)

    async def scenario() -> None:
        cluster = SimCluster(4, cfg, seed=12, key=None)
        await cluster.start()
        a_addr = cluster.address("m00")
        cluster.net.drop_filter = lambda _src, dst, data: (
            dst == a_addr and carries_alive_about_c(data)
        )
        start = asyncio.get_running_loop().time()
        # A forged accusation reaches A only (as if B's suspicion had been lost on its way).
        evil = cluster.net.transport("evil", 1)
        await evil.start()
        forged = wire.build_payload([wire.encode_message(wire.Suspect(1, "m02", "m01"))])
        evil.send_packet(a_addr, wire.seal(forged, None, b""))
        _, high = cfg.suspicion_timeouts(4)
        await cluster.run_for(3 * high)
        a = cluster.members["m00"]
        assert a.member("m02").state == SUSPECT
        assert a.stats["suspicions_rearmed"] >= 2
        assert cluster.events_of_kind("dead", since=start) == []
        cluster.net.drop_filter = None
        await cluster.wait_until(cluster.converged, timeout=2 * high)
        await evil.close()
        await cluster.shutdown()

    run_simulation(scenario())


def test_a_failing_event_callback_does_not_disturb_the_member() -> None:
    async def scenario() -> None:
        cluster = SimCluster(5, Config.lan(), seed=13)
        member = cluster.add("m00")

        def broken(event: MemberEvent) -> None:
            raise RuntimeError("subscriber bug")

        member.subscribe(broken)
        await cluster.start()
        await cluster.crash("m04")
        await cluster.wait_until(lambda: cluster.all_see("m04", DEAD), timeout=60)
        assert member.stats["event_callback_errors"] >= 5
        assert member.stats.get("internal_errors", 0) == 0
        await cluster.shutdown()

    run_simulation(scenario())


class _ConfirmerCluster(SimCluster):
    """m00-m02 confirm suspicions (as shoal's managers do) when ``confirm``; the others probe
    only every ``slow_probe`` s, without indirect probes or push-pulls, so they add no
    confirmations in time — as in the scale lab, where the starved workers' late probes
    accuse nobody and only the round-robin probes of the few responsive members confirm."""

    def __init__(self, n: int, cfg: Config, *, confirm: bool, slow_probe: float,
                 seed: int) -> None:
        super().__init__(n, cfg, seed=seed)
        self.confirm = confirm
        self.slow_probe = slow_probe

    def config_for(self, name: str) -> Config:
        cfg = super().config_for(name)
        if name in ("m00", "m01", "m02"):
            return cfg.replace(confirm_suspicions=self.confirm)
        # (no indirect probes either: their relays' nacks would end a probe early)
        return cfg.replace(probe_interval=self.slow_probe, indirect_checks=0,
                           push_pull_interval=0.0)


def _suspicion_to_death(confirm: bool, seed: int) -> tuple[float, int]:
    """Crash m20 in a 30-member cluster; (seconds from its first suspicion to its first death
    verdict anywhere, confirming probes sent)."""
    cfg = Config.lan()

    async def scenario() -> tuple[float, int]:
        cluster = _ConfirmerCluster(30, cfg, confirm=confirm, slow_probe=60.0, seed=seed)
        await cluster.start()
        await cluster.run_for(10)
        crashed_at = await cluster.crash("m20")
        await cluster.wait_until(lambda: cluster.all_see("m20", DEAD), timeout=120)
        suspected = min(o.at for o in cluster.events_about("m20", "suspect", since=crashed_at))
        dead = min(o.at for o in cluster.events_about("m20", "dead", since=crashed_at))
        confirming = cluster.total_stats().get("probes_confirming", 0)
        await cluster.shutdown()
        return dead - suspected, confirming

    return run_simulation(scenario())


def test_confirmers_bring_a_real_failure_to_the_minimum_suspicion_timeout() -> None:
    """Config.confirm_suspicions: members that probe a suspect as soon as they hear of the
    suspicion give it its independent confirmations within a probe period, so a crashed
    member is dead after the minimum suspicion timeout (plus the last-chance probe) even when
    everyone else probes slowly; without them the suspicion waits for the slow members'
    round-robin probes and its timeout stays longer. Same seeds, virtual time."""
    cfg = Config.lan()
    low, _ = cfg.suspicion_timeouts(30)
    bound = low + 3 * cfg.probe_interval  # + the last-chance probe and the confirmers' own
    slower = []
    for seed in (1, 2, 3, 4):
        with_confirmers, probes = _suspicion_to_death(True, seed)
        without, none = _suspicion_to_death(False, seed)
        assert probes >= 2 and none == 0
        assert with_confirmers <= bound, (seed, with_confirmers)
        slower.append(without > bound)
    assert sum(slower) >= 2, "without confirmers suspicions should have waited longer"


def test_a_confirmer_probing_a_live_suspect_makes_it_refute_at_once() -> None:
    """A forged suspicion of a live member reaches a confirmer only: the confirmer's probe
    carries the suspicion, the suspect answers and refutes, and nobody declares it dead."""
    from shoal.gossip import wire

    cfg = Config.lan(confirm_suspicions=True)

    async def scenario() -> None:
        cluster = SimCluster(6, cfg, seed=14, key=None)
        await cluster.start()
        await cluster.run_for(5)
        start = asyncio.get_running_loop().time()
        evil = cluster.net.transport("evil", 1)
        await evil.start()
        forged = wire.build_payload([wire.encode_message(wire.Suspect(1, "m03", "m01"))])
        evil.send_packet(cluster.address("m00"), wire.seal(forged, None, b""))
        await cluster.run_for(3 * cfg.probe_interval)
        assert cluster.members["m00"].stats["probes_confirming"] == 1
        refuted = cluster.events_about("m03", "alive-again", since=start)
        assert refuted and all(o.at - start <= 2 * cfg.probe_interval for o in refuted)
        _, high = cfg.suspicion_timeouts(6)
        await cluster.run_for(2 * high)
        assert cluster.events_of_kind("dead", since=start) == []
        assert cluster.members["m03"].stats["refutes"] >= 1
        await evil.close()
        await cluster.shutdown()

    run_simulation(scenario())


@pytest.mark.parametrize("seed", range(3))
def test_a_leave_with_metadata_survives_the_loss_of_one_direct_update(seed: int) -> None:
    """With gossip slow to spread (as in the test above), the one packet carrying the
    restart metadata straight to the leader is lost: the leave that follows carries the
    same incarnation, so a leader that saw it first would ignore the update for good. The
    update's half of the leave's timeout (probes and acks carry it too) must still bring
    it first."""
    cfg = Config.lan().replace(gossip_interval=5.0)

    async def scenario() -> None:
        cluster = SimCluster(5, cfg, seed=seed)
        await cluster.start()
        leaver = cluster.members["m03"]
        await cluster.run_for(1.0)
        src = leaver.member("m03").address  # type: ignore[union-attr]
        dst = cluster.members["m00"].member("m00").address  # type: ignore[union-attr]
        armed = [True]

        def drop_first(s: tuple[str, int], d: tuple[str, int], _data: bytes) -> bool:
            if armed[0] and s == src and d == dst:
                armed[0] = False
                return True
            return False

        cluster.net.drop_filter = drop_first
        await leaver.leave(timeout=1.0, meta={"restart": 30.0})
        await leaver.shutdown()
        cluster.crashed.add("m03")
        await cluster.wait_until(lambda: cluster.all_see("m03", LEFT), timeout=10)
        await cluster.run_for(10.0)
        seen = cluster.members["m00"].member("m03")
        assert seen is not None and seen.meta == {"restart": 30.0}
        await cluster.shutdown()

    run_simulation(scenario())
