"""Configuration of a gossip member: one dataclass, two presets, one validator.

Owns the meaning, units and defaults of every gossip tunable. It must not open sockets, read
files or hold runtime state. Defaults equal ``Config.lan()``; ``Config.local()`` overrides only
what differs, for loopback / network-namespace tests. Durations are seconds (float), sizes bytes.

The LAN defaults are shoal's, not memberlist's. memberlist's DefaultLANConfig (probe every 1 s,
500 ms timeout, gossip every 200 ms) takes ~5-6 s from a crash to "dead everywhere", Swarm ~15 s.
shoal targets a median of ≤ 2 s at 10 nodes and ≤ 3 s at 100, with no false failure under 5 %
packet loss or on a CPU-starved node, on a real LAN (sub-millisecond to few-millisecond RTT).
Detection time is, roughly (see timing.detection_bound for the bound)::

    first probe of the dead member   ~ probe_interval        (someone probes it each period)
  + that probe failing                 probe_interval
  + minimum suspicion timeout          suspicion_mult * max(1, log10 n) * probe_interval
                                       (shoal's last-chance probe runs in its last period)
  + spreading the death                ~ log(n) * gossip_interval

so it scales with probe_interval: ≈ 6 periods at 10 nodes, ≈ 10 at 100. probe_interval 0.2 s
gives ~1.1 s / ~2.1 s (in-memory simulation; measured figures with real processes are in
docs/benchmarks.md). The suspicion timeout keeps its memberlist multiplier (4): the rule
"declared dead only after ≥ 4 periods without a refutation, confirmed by independent members"
is unchanged, only the period is shorter. Robustness against a slow member comes from
Lifeguard (a member that misses acks or nacks slows itself down instead of accusing others)
and shoal's last-chance probe, not from long timeouts.

The default Config requires a cluster key: set ``secret_key`` (16, 24 or 32 bytes, AES-128/192/256
GCM). Only tests may set ``insecure_plaintext=True`` to run without one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from . import timing
from .errors import ConfigError

_KEY_SIZES = (16, 24, 32)
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(slots=True)
class Config:
    """Every tunable of a gossip member. See the module docstring for units."""

    # --- identity and addresses -------------------------------------------------------------
    # Unique member name (the node id); travels in every membership message. Required, 1-128
    # characters. Two live members with the same name conflict: the second is ignored.
    name: str = ""
    # Address the UDP and TCP sockets bind to. Default "0.0.0.0" (all IPv4 interfaces), which
    # then requires advertise_addr. "::" for IPv6.
    bind_addr: str = "0.0.0.0"
    # Port for both UDP (packets) and TCP (streams). Default 7946. 0 = let the OS pick a free
    # port (tests); the chosen port is then advertised.
    bind_port: int = 7946
    # Address other members use to reach us. Default "" = bind_addr, which must then not be a
    # wildcard. Set it behind NAT or when binding to 0.0.0.0.
    advertise_addr: str = ""
    # Port other members use to reach us. Default 0 = the bound port.
    advertise_port: int = 0
    # Cluster label, authenticated (AES-GCM associated data) but not secret: members with a
    # different label drop each other's traffic even if they share a key. Default "" (none).
    label: str = ""

    # --- encryption -------------------------------------------------------------------------
    # Primary cluster key: encrypts everything we send; 16/24/32 bytes (AES-128/192/256-GCM).
    # Required unless insecure_plaintext. Rotate with Memberlist.keyring (install/use/remove).
    secret_key: bytes | None = None
    # Extra keys accepted for decryption only (rotation in progress). Default () (none).
    extra_keys: tuple[bytes, ...] = ()
    # Tests only: run with no key, sending plain msgpack. Default False. A keyed member drops
    # plaintext packets and a plaintext member drops encrypted ones (counted, never crashes).
    insecure_plaintext: bool = False

    # --- failure detection (SWIM + Lifeguard) -----------------------------------------------
    # Time between two probes of (round-robin, shuffled) members. Default 0.2 s (memberlist:
    # 1 s). Every phase of detection is counted in probe periods (about 7 at 10 members, 11 at
    # 100: see the module docstring), so 0.2 s is what meets the ≤ 2 s / ≤ 3 s targets. Cost:
    # 5 pings + 5 acks per second sent and received by each member, ~1 KB/s, independent of
    # the cluster size. Lower detects sooner but costs more packets and CPU. Must be > 0.
    # Scaled up by the local health score (see awareness_max_multiplier).
    probe_interval: float = 0.2
    # How long to wait for the direct ack before asking indirect_checks other members to probe
    # for us. Default 0.1 s (memberlist: 0.5 s). Must exceed the network's 99th percentile RTT
    # *plus* the target's reaction time: a LAN RTT is 0.1-5 ms, so 100 ms leaves ~95 ms for a
    # busy Python agent to get scheduled and answer; a late ack only costs an indirect probe,
    # and a missed indirect probe only a suspicion (which the member refutes). Must be > 0 and
    # ≤ probe_interval / 2 so the indirect probes and their nacks fit in the probe period.
    probe_timeout: float = 0.1
    # How many members are asked to probe a target that missed its direct ack (ping-req).
    # Default 3. More = fewer false suspicions under loss, more packets. 0 = no indirect
    # probes (a single lost ping or ack starts a suspicion).
    indirect_checks: int = 3
    # Suspicion timeout multiplier: a suspect is declared dead after at least
    # suspicion_mult * max(1, log10(n)) * probe_interval (the minimum, reached with enough
    # independent confirmations). Default 4 (memberlist's): 0.8 s at ≤ 10 members, 1.6 s at
    # 100 with the default probe_interval. This is how long a member may be unresponsive
    # (paused, starved) and still refute in time. Higher = fewer false deaths, slower
    # detection (each step adds one probe period per log10(n)). Must be ≥ 1.
    suspicion_mult: int = 4
    # The suspicion timeout starts at this many times the minimum and shrinks towards the
    # minimum as other members confirm the suspicion (Lifeguard). Default 6. 1 = no dynamic
    # suspicion (always the minimum). Must be ≥ 1.
    suspicion_max_timeout_mult: int = 6
    # shoal addition: probe at once a member that another member suspects. The probe (direct,
    # then indirect) is an independent check, so a failed one is a Lifeguard confirmation:
    # with two such confirmers a real failure waits only the minimum suspicion timeout
    # instead of the others' round-robin probes (up to suspicion_max_timeout_mult times the
    # minimum with a single confirmation: 4.6 s at 105 members, measured in the scale lab);
    # a live suspect receives the suspicion with the ping and refutes it sooner. Meant for a
    # few members (shoal's managers), not all: each confirmer adds one probe round per
    # suspicion. Default False; Memberlist.confirm_suspicions switches it at run time.
    confirm_suspicions: bool = False
    # Lifeguard local health awareness: a member that misses acks or nacks, or has to refute a
    # suspicion about itself, raises a score up to this value - 1 and multiplies its own probe
    # interval and timeout by (score + 1). Default 8. 1 = disabled. Must be ≥ 1.
    awareness_max_multiplier: int = 8

    # --- dissemination -------------------------------------------------------------------------
    # Each membership change is piggybacked retransmit_mult * ceil(log10(n + 1)) times by every
    # member that learns it. Default 4. Higher = more robust spread under loss, more bytes.
    # Must be ≥ 1.
    retransmit_mult: int = 4
    # Period of the dedicated gossip round that sends queued broadcasts to gossip_nodes random
    # members (changes also ride on every probe packet). Default 0.1 s (memberlist: 0.2 s):
    # a suspicion and then a death each need ~log(n) rounds to reach everyone, so this halves
    # the spreading part of detection (~0.3 s instead of ~0.6 s at 100 members). Free at idle:
    # rounds run only while broadcasts are queued. 0 = no gossip rounds, changes spread only
    # by piggybacking on probes and by push-pull (slower).
    gossip_interval: float = 0.1
    # Members contacted per gossip round. Default 3. Must be ≥ 1 when gossip_interval > 0.
    gossip_nodes: int = 3
    # Dead or left members still receive gossip for this long after their death, so a member
    # wrongly declared dead learns it and can refute. Default 30 s. 0 = never gossip to the dead.
    gossip_to_the_dead_time: float = 30.0
    # Period of the full-state push-pull sync over TCP with one random live member (anti-
    # entropy). Default 30 s, scaled up above 32 members. 0 = disabled (join still syncs).
    push_pull_interval: float = 30.0
    # Period of an attempt to push-pull with one random dead (not left) member, so that the
    # two sides of a healed partition find each other again. Default 10 s (serf: 30 s): a node
    # whose link comes back is seen alive again (and its node READY) within ~10 s / (number
    # of members trying) instead of ~30 s. Cost: one TCP connect per period while some member
    # is dead, a refused or timed-out connect when it is really gone. 0 = disabled (a
    # partition then heals only through an explicit join()).
    reconnect_interval: float = 10.0
    # Dead and left members stay in members() this long, then are forgotten (event "reaped").
    # Default 3600 s. Must be ≥ gossip_to_the_dead_time. 0 = forget at the next probe round.
    dead_retention: float = 3600.0
    # A member name that is dead or left may be taken by a different address after this long.
    # Default 0 = never (the same name must come back on the same address, or wait for
    # dead_retention). Useful when nodes get new IPs on restart.
    dead_node_reclaim_time: float = 0.0

    # --- sizes and limits ---------------------------------------------------------------------
    # Largest UDP payload we send, encryption overhead included. Default 1400 bytes (fits a
    # 1500-byte Ethernet MTU). Broadcasts are packed until this is reached. Must be ≥ 512.
    packet_size: int = 1400
    # Inbound packets larger than this are dropped ("oversize"). Default 65507 (max UDP).
    max_packet_in: int = 65507
    # Largest stream frame (one push-pull state) accepted or sent. Default 4 MiB, enough for
    # ~15 000 members with small metadata. Must be ≥ 64 KiB.
    max_stream_frame: int = 4 * 1024 * 1024
    # Largest encoded metadata dict per member. Default 512 bytes; metadata rides on alive
    # messages, so it must fit a packet with room to spare (≤ packet_size / 2).
    meta_max_bytes: int = 512
    # Timeout for connecting, reading and writing a push-pull stream. Default 10 s.
    tcp_timeout: float = 10.0
    # Inbound packets waiting for the receive loop; more are dropped by the transport
    # (counted). Default 4096.
    packet_queue_size: int = 4096
    # Events buffered per subscriber of Memberlist.events(); more are dropped (counted, and the
    # subscriber is flagged overflowed). Default 4096.
    event_queue_size: int = 4096
    # How long leave() waits for its announcement to be retransmitted before returning.
    # Default 5 s. 0 = announce and return at once.
    leave_timeout: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.extra_keys, list):
            self.extra_keys = tuple(self.extra_keys)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def lan(cls, **overrides: object) -> Config:
        """Datacenter LAN timings (the defaults): crash → dead everywhere in a median 1.3 s
        at 10 members, 2.2 s at 100 (real processes; see the module docstring and
        docs/benchmarks.md)."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> Config:
        """Loopback and network-namespace tests: binds 127.0.0.1 on any port, and makes the
        slow background timers (push-pull, reconnect, retention, leave) short so tests do not
        wait for them. Failure detection uses the LAN timings (already sized for sub-ms RTT),
        with gossip rounds twice as frequent. Never for real networks: anti-entropy every 5 s
        costs O(n) bytes per member.
        """
        base: dict[str, object] = {
            "bind_addr": "127.0.0.1",
            "bind_port": 0,
            "retransmit_mult": 3,
            "gossip_interval": 0.05,
            "gossip_to_the_dead_time": 5.0,
            "push_pull_interval": 5.0,
            "reconnect_interval": 2.0,
            "dead_retention": 600.0,
            "tcp_timeout": 2.0,
            "leave_timeout": 1.0,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Config:
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # --- derived values ------------------------------------------------------------------------
    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        """(minimum, maximum) suspicion timeout for a cluster of ``n`` live members."""
        low = timing.suspicion_timeout(self.suspicion_mult, n, self.probe_interval)
        return low, low * self.suspicion_max_timeout_mult

    def detection_bound(self, n: int, first_probe_periods: int = 10) -> float:
        """Bound on crash → dead everywhere for ``n`` members (see timing.detection_bound)."""
        return timing.detection_bound(
            probe_interval=self.probe_interval,
            suspicion_mult=self.suspicion_mult,
            suspicion_max_timeout_mult=self.suspicion_max_timeout_mult,
            retransmit_mult=self.retransmit_mult,
            gossip_interval=self.gossip_interval or self.probe_interval,
            n=n,
            first_probe_periods=first_probe_periods,
        )

    def all_keys(self) -> list[bytes]:
        """Primary key first, then the extra keys (empty without encryption)."""
        keys = [self.secret_key] if self.secret_key is not None else []
        return keys + [k for k in self.extra_keys if k not in keys]

    # --- validation ---------------------------------------------------------------------------
    def validate(self) -> Config:
        """Check every field and the cross-field invariants; raise ConfigError or return self."""
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= 128:
            raise ConfigError("name", "must be a string of 1-128 characters")
        if not 0 <= self.bind_port <= 65535:
            raise ConfigError("bind_port", "must be 0-65535")
        if not 0 <= self.advertise_port <= 65535:
            raise ConfigError("advertise_port", "must be 0-65535")
        if not self.advertise_addr and self.bind_addr in _WILDCARDS:
            raise ConfigError(
                "advertise_addr",
                "required when bind_addr is a wildcard (other members must reach us)",
            )
        if self.advertise_addr:
            try:
                ipaddress.ip_address(self.advertise_addr)
            except ValueError:
                # Names are allowed (in-memory networks use them); only reject the unusable.
                if self.advertise_addr in _WILDCARDS or " " in self.advertise_addr:
                    raise ConfigError("advertise_addr", "not a usable address") from None
        self._validate_keys()
        positive = ("probe_interval", "probe_timeout", "tcp_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")
        if self.probe_timeout * 2 > self.probe_interval:
            raise ConfigError(
                "probe_timeout", "must be ≤ probe_interval / 2 (indirect probes need the rest)"
            )
        non_negative = (
            "gossip_interval",
            "gossip_to_the_dead_time",
            "push_pull_interval",
            "reconnect_interval",
            "dead_retention",
            "dead_node_reclaim_time",
            "leave_timeout",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be ≥ 0")
        if self.indirect_checks < 0:
            raise ConfigError("indirect_checks", "must be ≥ 0")
        for name in (
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "awareness_max_multiplier",
            "retransmit_mult",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be ≥ 1")
        if self.gossip_interval > 0 and self.gossip_nodes < 1:
            raise ConfigError("gossip_nodes", "must be ≥ 1 when gossip_interval > 0")
        if self.dead_retention < self.gossip_to_the_dead_time:
            raise ConfigError("dead_retention", "must be ≥ gossip_to_the_dead_time")
        if self.packet_size < 512:
            raise ConfigError("packet_size", "must be ≥ 512")
        if self.max_packet_in < self.packet_size:
            raise ConfigError("max_packet_in", "must be ≥ packet_size")
        if self.max_stream_frame < 64 * 1024:
            raise ConfigError("max_stream_frame", "must be ≥ 65536")
        if not 0 < self.meta_max_bytes <= self.packet_size // 2:
            raise ConfigError("meta_max_bytes", "must be 1 .. packet_size / 2")
        if self.packet_queue_size < 1:
            raise ConfigError("packet_queue_size", "must be ≥ 1")
        if self.event_queue_size < 1:
            raise ConfigError("event_queue_size", "must be ≥ 1")
        return self

    def _validate_keys(self) -> None:
        if self.secret_key is None:
            if self.extra_keys:
                raise ConfigError("extra_keys", "needs a secret_key (the primary) as well")
            if not self.insecure_plaintext:
                raise ConfigError(
                    "secret_key", "a cluster key is required (insecure_plaintext is for tests only)"
                )
            return
        if self.insecure_plaintext:
            raise ConfigError("insecure_plaintext", "cannot be combined with secret_key")
        for name, key in [("secret_key", self.secret_key)] + [
            ("extra_keys", k) for k in self.extra_keys
        ]:
            if not isinstance(key, bytes) or len(key) not in _KEY_SIZES:
                raise ConfigError(name, "keys must be 16, 24 or 32 bytes")


# Kept for symmetry with other components' configs: the field list, for docs and the CLI.
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
