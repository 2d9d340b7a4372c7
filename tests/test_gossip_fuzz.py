"""Hostile input never crashes a gossip member: it is dropped, counted by reason, and the
member keeps working (detects failures, accepts joins).

Thousands of packets from a seeded generator: random bytes, plaintext to a keyed member,
wrongly-keyed, truncated and bit-flipped packets, oversize datagrams, correctly encrypted junk
structures, and junk on the stream (push-pull) port. Once on the in-memory network in virtual
time, once over real UDP/TCP on loopback.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import msgpack

from shoal.gossip import Config, Keyring, Memberlist, MemberState, MessageType, wire
from shoal.gossip.simloop import run_simulation
from shoal.gossip.testing import SimCluster

KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
AAD = wire.aad_for(wire.PACKET_AAD_KIND, "")
STREAM_AAD = wire.aad_for(wire.STREAM_AAD_KIND, "")


def junk(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(
            [
                None,
                True,
                rng.randint(-(2**40), 2**64 - 1),
                rng.randint(0, 300),
                rng.random(),
                "m0" + str(rng.randint(0, 3)),
                "x" * rng.randint(0, 300),
                rng.randbytes(rng.randint(0, 60)),
            ]
        )
    if roll < 0.85:
        head = [rng.choice([*range(0, 10), 255])] if rng.random() < 0.8 else []
        return head + [junk(rng, depth + 1) for _ in range(rng.randint(0, 8))]
    return {f"k{i}": junk(rng, depth + 1) for i in range(rng.randint(0, 4))}


def hostile_packets(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """(category, datagram) pairs; every category except "junk" must always be dropped."""
    ring, wrong = Keyring(KEY), Keyring(WRONG_KEY)
    # Legit-looking messages that would hurt if accepted: kill m01, impersonate m02.
    harmful = wire.build_payload(
        [
            wire.encode_message(wire.Dead(99, "m01", "evil")),
            wire.encode_message(wire.Alive(99, "m02", "evil", 1, b"", (1, 1, 1))),
        ]
    )
    valid = wire.seal(harmful, ring, AAD)
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        kind = i % 7
        if kind == 0:
            out.append(("random", rng.randbytes(rng.randint(0, 1500))))
        elif kind == 1:
            out.append(("plaintext", wire.seal(harmful, None, AAD)))
        elif kind == 2:
            out.append(("wrong_key", wire.seal(harmful, wrong, AAD)))
        elif kind == 3:
            flipped = bytearray(valid)
            flipped[rng.randrange(1, len(flipped))] ^= 1 << rng.randrange(8)
            out.append(("bit_flip", bytes(flipped)))
        elif kind == 4:
            out.append(("truncated", valid[: rng.randrange(len(valid))]))
        elif kind == 5 and i % 70 == 5:
            out.append(("oversize", b"\x01" + rng.randbytes(70_000)))
        elif kind == 5:
            garbage = rng.randbytes(rng.randint(1, 200))  # encrypted, but not msgpack
            out.append(("junk", wire.seal(garbage, ring, AAD)))
        else:
            obj = [1, *(junk(rng, 1) for _ in range(rng.randint(1, 4)))]
            out.append(("junk", wire.seal(msgpack.packb(obj, use_bin_type=True), ring, AAD)))
    return out


def drops(stats: dict[str, int]) -> int:
    return sum(v for k, v in stats.items() if k.startswith("drop.") and k != "drop.stream_frames")


def test_fuzzed_packets_and_streams_are_dropped_counted_and_harmless() -> None:
    async def scenario() -> None:
        cluster = SimCluster(4, Config.lan(), seed=21, key=KEY)
        await cluster.start()
        target = cluster.members["m00"]
        evil = cluster.net.transport("evil", 6666)
        await evil.start()
        rng = random.Random(1234)
        packets = hostile_packets(rng, 4200)
        before = drops(target.stats)
        for i, (_, data) in enumerate(packets):
            evil.send_packet(target.address, data)
            if i % 200 == 0:
                await asyncio.sleep(0.01)
        # junk on the stream port: garbage, wrong key, plaintext, oversize
        frames = [
            rng.randbytes(100),
            b"",
            wire.seal(b"\x92\x01\x90", Keyring(WRONG_KEY), STREAM_AAD),
            wire.seal(msgpack.packb([1, [MessageType.PUSH_PULL, 1, [[1]]]]), None, STREAM_AAD),
            wire.seal(msgpack.packb([1, [MessageType.PING, 1, "m00"]]), Keyring(KEY), STREAM_AAD),
        ]
        for frame in frames * 10:
            stream = await evil.open_stream(target.address, 1.0)
            await stream.send(frame)
            await stream.close()
        big = await evil.open_stream(target.address, 1.0)
        await big.send(b"\x01" * (target.config.max_stream_frame + 1))
        await big.close()
        await cluster.run_for(5)

        stats = target.stats
        always_dropped = sum(1 for kind, _ in packets if kind != "junk")
        junk_sent = len(packets) - always_dropped
        assert drops(stats) - before >= always_dropped + 0.9 * junk_sent + len(frames) * 10
        for reason in (
            "unencrypted", "decrypt", "short", "oversize", "malformed", "bad_shape",
            "unknown_type", "version",
        ):
            assert stats.get(f"drop.{reason}", 0) > 0, (reason, stats)
        assert stats.get("drop.internal", 0) == 0
        assert stats.get("internal_errors", 0) == 0
        # nothing harmful got through: m01 alive, m02 still at its own address
        assert cluster.all_see("m01", MemberState.ALIVE)
        assert all(
            m.member("m02") is not None and m.member("m02").addr == "m02"
            for m in cluster.live()
        )
        # and the member still works: it detects a crash and accepts a newcomer
        await cluster.crash("m03")
        await cluster.wait_until(lambda: target.member("m03").state == MemberState.DEAD, 60)
        newcomer = cluster.add("m04")
        await newcomer.start()
        await newcomer.join([target.address])
        await cluster.wait_until(cluster.converged, 30)
        await evil.close()
        await cluster.shutdown()

    run_simulation(scenario())


async def test_fuzzed_udp_and_tcp_traffic_on_loopback_is_dropped_and_counted() -> None:
    cfg = Config.local(secret_key=KEY)
    a = Memberlist(cfg.replace(name="a"))
    b = Memberlist(cfg.replace(name="b"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await a.start()
        await b.start()
        await b.join([a.address])
        rng = random.Random(99)
        packets = [p for p in hostile_packets(rng, 1400) if p[0] != "oversize"]
        before = drops(a.stats)
        for i, (_, data) in enumerate(packets):
            sock.sendto(data, a.address)
            if i % 100 == 0:
                await asyncio.sleep(0.005)
        for frame in (b"\x00\x00\x00\x05hello", struct.pack(">I", 2**31) + b"x", b"\x01" * 64):
            reader, writer = await asyncio.open_connection(*a.address)
            writer.write(frame)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            del reader

        async def settled() -> None:
            while drops(a.stats) - before < len(packets) * 0.9:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(settled(), 10)
        assert a.stats.get("drop.internal", 0) == 0
        assert a.stats.get("internal_errors", 0) == 0
        # still a working pair: b sees a alive and a answers b's probes
        probes_before = b.stats.get("probes", 0)
        await asyncio.sleep(1.0)
        assert b.stats["probes"] > probes_before
        assert b.member("a").state == MemberState.ALIVE
        assert a.member("b").state == MemberState.ALIVE
    finally:
        sock.close()
        await a.shutdown()
        await b.shutdown()
