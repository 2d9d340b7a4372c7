"""Wire format and keyring of shoal.gossip: round trips, rejection reasons, key rotation, and a
hypothesis fuzz of the decoder (whatever arrives, only WireError comes out)."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.gossip import (
    DropReason,
    Keyring,
    KeyringError,
    MemberState,
    MessageType,
    WireError,
    wire,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = bytes(range(16))
AAD = wire.aad_for(wire.PACKET_AAD_KIND, "")
META = wire.encode_meta({"role": "manager", "labels": {"zone": "a"}, "version": "0.1.0"})

SAMPLES: list[wire.Message] = [
    wire.Ping(7, "n1"),
    wire.IndirectPing(2**32 - 1, "n2", "127.0.0.1", 7946, True),
    wire.Ack(0),
    wire.Nack(9),
    wire.Suspect(3, "n1", "n2"),
    wire.Alive(2**63, "n3", "::1", 65535, META, (1, 1, 1)),
    wire.Dead(5, "n1", "n1"),
]


def test_message_type_numbers_are_the_protocol() -> None:
    # Only append: changing any of these breaks mixed-version clusters.
    assert {t.name: t.value for t in MessageType} == {
        "PING": 1,
        "INDIRECT_PING": 2,
        "ACK": 3,
        "NACK": 4,
        "SUSPECT": 5,
        "ALIVE": 6,
        "DEAD": 7,
        "PUSH_PULL": 8,
    }
    states = {s.name: s.value for s in MemberState}
    assert states == {"ALIVE": 0, "SUSPECT": 1, "DEAD": 2, "LEFT": 3}
    assert wire.PROTOCOL_VERSION_MIN <= wire.PROTOCOL_VERSION <= wire.PROTOCOL_VERSION_MAX


@pytest.mark.parametrize("keyed", [True, False])
def test_compound_packet_round_trips(keyed: bool) -> None:
    ring = Keyring(K1) if keyed else None
    data = wire.seal(wire.build_payload([wire.encode_message(m) for m in SAMPLES]), ring, AAD)
    assert wire.open_packet(data, ring, AAD, 65507) == SAMPLES


def test_push_pull_frame_round_trips() -> None:
    rec = wire.NodeRecord("n1", "127.0.0.1", 1, META, 4, MemberState.SUSPECT, (1, 1, 1))
    msg = wire.PushPull(True, (rec,) * 3)
    aad = wire.aad_for(wire.STREAM_AAD_KIND, "")
    frame = wire.seal(wire.build_payload([wire.encode_message(msg)]), Keyring(K1), aad)
    assert wire.open_frame(frame, Keyring(K1), aad) == msg


def test_newer_versions_may_append_fields() -> None:
    payload = msgpack.packb([1, [MessageType.PING, 1, "n1", "future-field", 42]])
    assert wire.open_packet(b"\x00" + payload, None, AAD, 65507) == [wire.Ping(1, "n1")]


def _reason(data: bytes, ring: Keyring | None = None, aad: bytes = AAD) -> DropReason:
    with pytest.raises(WireError) as info:
        wire.open_packet(data, ring, aad, 2000)
    return info.value.reason


def _plain(obj: object) -> bytes:
    return b"\x00" + msgpack.packb(obj)


def test_rejections_name_their_reason() -> None:
    good = wire.build_payload([wire.encode_message(wire.Ping(1, "n1"))])
    assert _reason(b"") == DropReason.SHORT
    assert _reason(b"\x00" * 3000) == DropReason.OVERSIZE
    assert _reason(b"\x00" + good, Keyring(K1)) == DropReason.UNENCRYPTED
    assert _reason(wire.seal(good, Keyring(K1), AAD)) == DropReason.ENCRYPTED
    assert _reason(wire.seal(good, Keyring(K2), AAD), Keyring(K1)) == DropReason.DECRYPT
    other_label = wire.aad_for(wire.PACKET_AAD_KIND, "other-cluster")
    assert _reason(wire.seal(good, Keyring(K1), other_label), Keyring(K1)) == DropReason.DECRYPT
    assert _reason(b"\x01" + b"x" * 20, Keyring(K1)) == DropReason.SHORT
    assert _reason(b"\x07" + good) == DropReason.VERSION
    assert _reason(b"\x00\xc1\xc1") == DropReason.MALFORMED
    assert _reason(_plain([99, [1, 1, "n"]])) == DropReason.VERSION
    assert _reason(_plain([1, [200, 1]])) == DropReason.UNKNOWN_TYPE
    assert _reason(_plain([1, [MessageType.PING, True, "n"]])) == DropReason.BAD_SHAPE
    assert _reason(_plain([1, [MessageType.PING, -1, "n"]])) == DropReason.BAD_SHAPE
    assert _reason(_plain([1, [MessageType.PING, 1]])) == DropReason.BAD_SHAPE
    assert _reason(_plain([1, [MessageType.ACK, 2**32]])) == DropReason.BAD_SHAPE
    assert _reason(_plain({"a": 1})) == DropReason.BAD_SHAPE
    assert _reason(_plain([1])) == DropReason.BAD_SHAPE
    bad_meta = [MessageType.ALIVE, 1, "n", "h", 1, b"\x01", [1, 1, 1]]
    assert _reason(_plain([1, bad_meta])) == DropReason.BAD_SHAPE
    push = [MessageType.PUSH_PULL, False, []]
    assert _reason(_plain([1, push])) == DropReason.UNEXPECTED


def test_keyring_rotation_without_downtime() -> None:
    old, new = Keyring(K1), Keyring(K1)
    sealed_old = wire.seal(b"\x92\x01\x01", old, AAD)
    new.install_key(K2)  # step 1: everyone can read K2
    assert new.decrypt(sealed_old[1:], AAD) == b"\x92\x01\x01"
    new.use_key(K2)  # step 2: send under K2, still read K1
    assert new.primary == K2 and new.keys() == [K2, K1]
    assert new.decrypt(sealed_old[1:], AAD) == b"\x92\x01\x01"
    sealed_new = wire.seal(b"\x92\x01\x01", new, AAD)
    with pytest.raises(WireError):
        old.decrypt(sealed_new[1:], AAD)  # a member still on K1 only cannot read K2 traffic
    new.remove_key(K1)  # step 3
    with pytest.raises(WireError):
        new.decrypt(sealed_old[1:], AAD)


def test_keyring_refuses_bad_operations() -> None:
    ring = Keyring(K1, [K3])
    with pytest.raises(KeyringError):
        ring.remove_key(K1)  # the primary
    with pytest.raises(KeyringError):
        ring.use_key(K2)  # not installed
    with pytest.raises(KeyringError):
        ring.remove_key(K2)
    with pytest.raises(KeyringError):
        ring.install_key(b"short")
    ring.install_key(K3)  # idempotent
    assert ring.keys() == [K1, K3]


# ------------------------------------------------------------------------------ fuzzing

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_obj = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
# Structures that look like gossip messages: a known type first, then junk fields.
_msgish = st.builds(
    lambda t, rest: [t, *rest],
    st.sampled_from([int(t) for t in MessageType] + [0, 9, 255, -1]),
    st.lists(_obj, max_size=8),
)
_payloadish = st.one_of(
    _obj,
    st.builds(lambda msgs: [1, *msgs], st.lists(_msgish, min_size=1, max_size=4)),
)


def _must_only_raise_wire_error(data: bytes, ring: Keyring | None) -> None:
    with contextlib.suppress(WireError):
        wire.open_packet(data, ring, AAD, 65507)


@settings(max_examples=100, deadline=None, database=None)
@given(_payloadish)
def test_fuzz_structured_payloads_only_raise_wire_error(obj: object) -> None:
    packed = msgpack.packb(obj, use_bin_type=True)
    _must_only_raise_wire_error(b"\x00" + packed, None)
    _must_only_raise_wire_error(wire.seal(packed, Keyring(K1), AAD), Keyring(K1))


@settings(max_examples=1500, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_wire_error(data: bytes) -> None:
    _must_only_raise_wire_error(data, None)
    _must_only_raise_wire_error(data, Keyring(K1))
    _must_only_raise_wire_error(b"\x00" + data, None)


def junk(rng: random.Random, depth: int = 0) -> object:
    """A seeded generator of msgpack-able junk, biased towards gossip-like shapes."""
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.randint(-(2**40), 2**64 - 1),
                rng.randint(0, 300),
                rng.random(),
                "n" * rng.randint(0, 200),
                rng.randbytes(rng.randint(0, 50)),
            ]
        )
    if roll < 0.8:
        head = [rng.choice([*range(0, 10), 255])] if rng.random() < 0.7 else []
        return head + [junk(rng, depth + 1) for _ in range(rng.randint(0, 8))]
    return {f"k{i}": junk(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_fuzz_seeded_structures_only_raise_wire_error() -> None:
    rng = random.Random(11)
    ring = Keyring(K1)
    for _ in range(5000):
        msgs = [junk(rng, 1) for _ in range(rng.randint(1, 4))]
        obj = [rng.choice([1, 1, 1, 0, 2]), *msgs] if rng.random() < 0.9 else junk(rng)
        packed = msgpack.packb(obj, use_bin_type=True)
        _must_only_raise_wire_error(b"\x00" + packed, None)
        _must_only_raise_wire_error(wire.seal(packed, ring, AAD), ring)


def test_fuzz_bit_flips_of_valid_packets_are_rejected_or_parsed() -> None:
    rng = random.Random(7)
    payload = wire.build_payload([wire.encode_message(m) for m in SAMPLES])
    sealed = wire.seal(payload, Keyring(K1), AAD)
    for _ in range(2000):
        plain = bytearray(b"\x00" + payload)
        enc = bytearray(sealed)
        for buf in (plain, enc):
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        _must_only_raise_wire_error(bytes(plain), None)
        if bytes(enc) != sealed:  # two flips of one bit cancel out
            with pytest.raises(WireError):  # AES-GCM authenticates every bit
                wire.open_packet(bytes(enc), Keyring(K1), AAD, 65507)
        cut = rng.randrange(len(payload))
        _must_only_raise_wire_error(b"\x00" + payload[:cut], None)
