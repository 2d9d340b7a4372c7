"""The cluster-wide MQTT bridge setting (``shoal mqtt set/show/unset``), as replicated state.

Owns: the ``MqttSetting`` record kept in ``ClusterInfo.mqtt`` and the two state-machine
commands that write it, ``mqtt_set`` and ``mqtt_unset``. Like every handler of
shoal.raft.state it is pure: no I/O, no clock (``now`` comes in the command), no randomness
(the command key is made by the manager that proposes). Must not touch: sealing (the values
arrive sealed: the password, the client key and the command key are ``sealed:…`` texts under
the managers' key, shoal.node.sealing, so the Raft log and every worker's replica hold only
ciphertext), the network, the bridge (shoal.node.mqtt follows this record).

Commands::

    {"op": "mqtt_set", "setting": {MqttSetting fields but version/updated_at}, "now": T,
     "version": V?}      replaces the setting; ``version`` (optional) is the one the writer
                         read: a concurrent change makes it a ``conflict`` (field version)
    {"op": "mqtt_unset"} removes it (a no-op when none is set)

Each accepted ``mqtt_set`` raises ``version`` by one: the bridges restart on a new version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from shoal.raft.errors import Rejected


class ClusterState(Protocol):
    """What the handlers touch of shoal.raft.state.ClusterState (not imported: it imports
    this module)."""

    cluster: Any

SEALED_PREFIX = "sealed:"  # (shoal.node.sealing.TEXT_PREFIX: this layer does not import it)
URL_RE = re.compile(r"^mqtts?://[^\s/?#]+$")
MAX_PEM = 64 * 1024


@dataclass(frozen=True)
class MqttSetting:
    """What every node's bridge uses unless its agent has its own ``--mqtt-url``."""

    url: str  # mqtt[s]://[USER@]HOST[:PORT], never with a password
    topic_prefix: str = ""  # "" = shoal/ + the cluster id's first 12 characters
    password: str = ""  # sealed text (AAD shoal/mqtt/password); "" = none
    ca: str = ""  # PEM of the CA(s) that signed the broker's certificate; "" = system CAs
    client_cert: str = ""  # PEM client certificate (public)
    client_key: str = ""  # sealed text of its PEM key (AAD shoal/mqtt/client-key)
    commands: bool = False  # opt-in scale commands over MQTT
    command_key: str = ""  # sealed text of the HMAC key (AAD shoal/mqtt/command-key)
    command_key_version: int = 0  # raised at each new command key (rotation)
    version: int = 0  # raised by one at every mqtt_set
    updated_at: float = 0.0


_SEALED = ("password", "client_key", "command_key")


def _text(raw: dict[str, Any], name: str, limit: int = MAX_PEM) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise Rejected("invalid", f"mqtt {name} must be a string of at most {limit} "
                       "characters", name)
    if value and name in _SEALED and not value.startswith(SEALED_PREFIX):
        raise Rejected("invalid", f"mqtt {name} must be sealed", name)
    return value


def mqtt_set(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    raw = cmd.get("setting")
    if not isinstance(raw, dict):
        raise Rejected("invalid", "setting must be a map", "setting")
    old = state.cluster.mqtt
    want = cmd.get("version")
    if want is not None and want != (old.version if old else 0):
        raise Rejected("conflict", "the MQTT setting changed meanwhile: read it again",
                       "version")
    url = _text(raw, "url", 512)
    if not URL_RE.match(url):
        raise Rejected("invalid", "url must be mqtt[s]://[USER@]HOST[:PORT]", "url")
    commands = raw.get("commands", False)
    if not isinstance(commands, bool):
        raise Rejected("invalid", "commands must be true or false", "commands")
    ckv = raw.get("command_key_version", 0)
    if isinstance(ckv, bool) or not isinstance(ckv, int) or ckv < 0:
        raise Rejected("invalid", "command_key_version must be a whole number",
                       "command_key_version")
    texts = {f.name: _text(raw, f.name) for f in fields(MqttSetting)
             if f.type == "str" and f.name != "url"}
    if commands and not texts["command_key"]:
        raise Rejected("invalid", "commands need a command key", "command_key")
    setting = MqttSetting(url=url, commands=commands, command_key_version=ckv,
                          version=(old.version if old else 0) + 1,
                          updated_at=float(cmd["now"]), **texts)
    state.cluster = replace(state.cluster, mqtt=setting)
    return {"version": setting.version}


def mqtt_unset(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    had = state.cluster.mqtt is not None
    state.cluster = replace(state.cluster, mqtt=None)
    return {"removed": had}


__all__ = ["MqttSetting", "mqtt_set", "mqtt_unset"]
