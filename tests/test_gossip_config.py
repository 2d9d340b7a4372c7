"""Config of shoal.gossip: presets, validation, and that every field is documented."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from shoal.gossip import Config, ConfigError
from shoal.gossip.config import CONFIG_FIELDS

KEY = bytes(range(32))


def test_default_config_requires_a_cluster_key() -> None:
    with pytest.raises(ConfigError) as info:
        Config(name="n1", bind_addr="127.0.0.1").validate()
    assert info.value.field == "secret_key"


def test_plaintext_is_an_explicit_opt_in() -> None:
    Config(name="n1", bind_addr="127.0.0.1", insecure_plaintext=True).validate()
    with pytest.raises(ConfigError):
        Config(name="n1", bind_addr="127.0.0.1", secret_key=KEY, insecure_plaintext=True).validate()


@pytest.mark.parametrize("size", [0, 8, 15, 17, 31, 33, 64])
def test_keys_must_be_aes_sizes(size: int) -> None:
    with pytest.raises(ConfigError):
        Config(name="n", bind_addr="127.0.0.1", secret_key=bytes(size)).validate()
    with pytest.raises(ConfigError):
        Config(
            name="n", bind_addr="127.0.0.1", secret_key=KEY, extra_keys=(bytes(size),)
        ).validate()


def test_wildcard_bind_needs_an_advertise_address() -> None:
    with pytest.raises(ConfigError) as info:
        Config(name="n", secret_key=KEY).validate()
    assert info.value.field == "advertise_addr"
    Config(name="n", secret_key=KEY, advertise_addr="10.1.2.3").validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "x" * 129),
        ("probe_interval", 0.0),
        ("probe_timeout", 0.6),  # > probe_interval / 2
        ("suspicion_mult", 0),
        ("suspicion_max_timeout_mult", 0),
        ("awareness_max_multiplier", 0),
        ("retransmit_mult", 0),
        ("indirect_checks", -1),
        ("gossip_nodes", 0),
        ("gossip_interval", -1.0),
        ("packet_size", 100),
        ("meta_max_bytes", 1000),
        ("max_stream_frame", 1000),
        ("dead_retention", 1.0),
        ("bind_port", 70000),
    ],
)
def test_validate_names_the_offending_field(field: str, value: object) -> None:
    cfg = Config.lan(name="n", bind_addr="127.0.0.1", secret_key=KEY).replace(**{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == field


def test_presets_are_valid_and_local_only_shortens_background_timers() -> None:
    lan = Config.lan(name="n", bind_addr="127.0.0.1", secret_key=KEY).validate()
    local = Config.local(name="n", secret_key=KEY).validate()
    assert lan == Config(name="n", bind_addr="127.0.0.1", secret_key=KEY)
    # failure detection is the LAN's (what the agent ships is what tests exercise)...
    assert (local.probe_interval, local.probe_timeout, local.suspicion_mult) == (
        lan.probe_interval, lan.probe_timeout, lan.suspicion_mult)
    assert local.detection_bound(10) <= lan.detection_bound(10)
    # ...only the slow background timers are shorter
    assert local.push_pull_interval < lan.push_pull_interval
    assert local.reconnect_interval < lan.reconnect_interval
    assert local.leave_timeout < lan.leave_timeout
    # local() overrides only what differs; untouched fields keep the LAN default
    assert local.indirect_checks == lan.indirect_checks
    assert Config.local(probe_interval=0.5).probe_interval == 0.5


def test_lan_defaults_are_sized_for_the_detection_targets() -> None:
    """The defaults meet "median ≤ 2 s at 10 nodes, ≤ 3 s at 100" on paper: the expected
    time (first probe + failed probe + minimum suspicion + last-chance probe, in probe periods)
    leaves room for spreading, and a member may stay silent ≥ 0.8 s and still refute."""
    cfg = Config.lan()
    for n, target in ((10, 2.0), (100, 3.0)):
        low, _high = cfg.suspicion_timeouts(n)
        expected = 3 * cfg.probe_interval + low
        assert expected <= 0.8 * target, (n, expected)
    assert cfg.suspicion_timeouts(4)[0] >= 0.8
    assert cfg.probe_timeout >= 0.05  # well above a LAN RTT plus scheduling delay


def test_every_config_field_has_a_comment() -> None:
    source = inspect.getsource(Config)
    lines = source.splitlines()
    for field in dataclasses.fields(Config):
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        assert lines[index - 1].strip().startswith("#"), f"{field.name} has no comment"
    assert set(CONFIG_FIELDS) == {f.name for f in dataclasses.fields(Config)}
