"""The MQTT bridge's supervision and its cluster-wide setting: which bridge this node runs.

Owns: ``MqttSupervisor`` (runs this node's bridge, from the agent's ``--mqtt-*`` flags or the
cluster-wide setting, followed live) and ``MqttSettings`` (the setting's API routes and the
members' credentials fetch). The bridge itself — topics, QoS, delivery of events, commands,
connection errors — is shoal.node.mqttbridge; the flags' rules, back-off, failure reasons and
the command signature are shoal.node.mqttconfig. Must not touch: the cluster state beyond
proposing the setting's ops (``mqtt_set``/``mqtt_unset``, shoal.raft.mqttsetting), the
connection to the broker, the API beyond its routes.

The cluster-wide setting (``shoal mqtt set``; ``MqttSettings`` serves its routes,
``MqttSupervisor`` runs the bridge): one record in Raft (shoal.raft.mqttsetting) with the
password, client key and command key sealed under the managers' key (shoal.node.sealing, AAD
``shoal/mqtt/…``). Every agent follows it live (a new version → the bridge is replaced; unset
→ stopped) unless it was started with its own ``--mqtt-url``: **the flags win** (that agent
ignores the cluster setting). Managers unseal it themselves; a worker fetches the password and
client key from a manager (``POST /v1/cluster/mqtt``, mTLS); the command key never leaves the
managers (only the leader checks commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Protocol

from shoal.node.errors import ApiError, BadRequest, NotFound, SealError, Unavailable
from shoal.node.events import EventLog
from shoal.node.mqttbridge import BridgeContext, MqttBridge, MqttCollector, UpdateService
from shoal.node.mqttconfig import MqttConfig
from shoal.node.sealing import seal_text, unseal_text
from shoal.node.source import ManagerSource, StateSource, after_applied
from shoal.raft.models import NodeRole, NodeState
from shoal.raft.mqttsetting import MqttSetting

log = logging.getLogger("shoal.mqtt")


# --------------------------------------------------------------------------- cluster-wide

# How often an agent looks at the cluster-wide MQTT setting when no entry is applied,
# seconds (a change of the setting is an applied entry: it wakes the agent at once).
IDLE_LOOK = 10.0
AAD_PASSWORD = b"shoal/mqtt/password"
AAD_CLIENT_KEY = b"shoal/mqtt/client-key"
AAD_COMMAND_KEY = b"shoal/mqtt/command-key"


class SettingContext(BridgeContext, Protocol):
    """What the setting's routes need (shoal.node.context.NodeContext)."""

    def require_member(self) -> StateSource: ...
    def require_manager(self) -> ManagerSource: ...
    async def propose(self, cmd: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]: ...


class Peers(Protocol):
    """shoal.node.security.Security: the peer check and calls to managers."""

    def authorize(self, peer: Any, manager: bool = False) -> Any: ...
    def manager_key(self) -> bytes: ...
    async def call(self, addr: str, path: str, body: dict[str, Any], *,
                   timeout: float = 10.0) -> dict[str, Any]: ...


def _pem_field(value: Any, name: str, kind: str) -> str:
    """A PEM text of ``kind`` (cert / key) that parses; BadRequest naming ``name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    if not isinstance(value, str) or not value.strip() or len(value) > 64 * 1024:
        raise BadRequest(f"{name} must be PEM text", name)
    try:
        if kind == "key":
            serialization.load_pem_private_key(value.encode(), None)
        else:
            if not x509.load_pem_x509_certificates(value.encode()):
                raise ValueError("no certificate")
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"{name}: not a PEM {'private key' if kind == 'key' else 'certificate'}"
                         f" ({exc})", name) from None
    return value


class MqttSettings:
    """The routes of ``shoal mqtt set/show/unset/command-key`` (managers) and the members'
    credentials fetch (``POST /v1/cluster/mqtt``, a worker's bridge: it cannot unseal).

    ``set`` writes the whole setting from its request; what it does not repeat is kept from
    the one before: the password (while the URL's user stays the same), the CA, the client
    certificate and key, and the command key while commands stay on (``rotate_command_key``
    makes a new one: publishers need it then)."""

    def __init__(self, ctx: SettingContext, security: Peers) -> None:
        self.ctx = ctx
        self.security = security

    def _setting(self) -> MqttSetting | None:
        return self.ctx.require_member().snapshot().cluster.mqtt

    def show(self) -> dict[str, Any]:
        """The setting without its secrets; ``{"set": false}`` when there is none."""
        s = self._setting()
        ident = self.ctx.identity
        if s is None:
            return {"set": False}
        prefix = s.topic_prefix or f"shoal/{ident.cluster_id[:12] if ident else 'none'}"
        return {"set": True, "url": s.url, "topic_prefix": s.topic_prefix, "topics": prefix,
                "password": bool(s.password), "ca": bool(s.ca),
                "client_cert": bool(s.client_cert), "commands": s.commands,
                "command_key_version": s.command_key_version, "version": s.version,
                "updated_at": s.updated_at}

    async def set(self, body: dict[str, Any]) -> dict[str, Any]:
        self.ctx.require_manager()
        mkey = self.security.manager_key()
        old = self._setting()
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise BadRequest("url is required: mqtt[s]://[USER@]HOST[:PORT]", "url")
        try:
            tls, _host, _port, user = MqttConfig(url=url).broker()
        except ValueError as exc:
            raise BadRequest(str(exc).replace("--mqtt-url", "url")
                             .replace("--mqtt-password-file", "--password-stdin")
                             .replace("--mqtt-topic-prefix", "--topic-prefix"), "url") from None
        old_user = MqttConfig(url=old.url).broker()[3] if old is not None else None
        prefix = body.get("topic_prefix", "")
        if not isinstance(prefix, str) or len(prefix) > 200 or (prefix and (
                any(c in prefix for c in "+#\0") or prefix.startswith("/")
                or prefix.endswith("/"))):
            raise BadRequest("topic_prefix must be a topic without +, # or a leading/"
                             "trailing /", "topic_prefix")
        password = body.get("password")
        if password is not None and (not isinstance(password, str) or "\n" in password
                                     or len(password) > 1024):
            raise BadRequest("password must be one line of text", "password")
        if password and not user:
            raise BadRequest("a password needs a user in the url (mqtts://USER@HOST)", "url")
        for flag in ("commands", "rotate_command_key"):
            if not isinstance(body.get(flag, False), bool):
                raise BadRequest(f"{flag} must be true or false", flag)
        ca = body.get("ca")
        if ca is not None:
            ca = _pem_field(ca, "ca", "cert")
        cert, key = body.get("client_cert"), body.get("client_key")
        if (cert is None) != (key is None):
            raise BadRequest("client_cert and client_key go together", "client_key")
        if cert is not None:
            cert, key = _pem_field(cert, "client_cert", "cert"), _pem_field(key, "client_key",
                                                                            "key")
        if (ca or cert) and not tls:
            raise BadRequest("ca and client_cert need an mqtts:// url", "url")
        setting: dict[str, Any] = {"url": url, "topic_prefix": prefix, "ca": "",
                                   "client_cert": "", "client_key": "", "password": "",
                                   "commands": body.get("commands", False),
                                   "command_key": "", "command_key_version": 0}
        if old is not None and tls:
            setting.update(ca=old.ca, client_cert=old.client_cert, client_key=old.client_key)
        if old is not None and old_user == user:
            setting["password"] = old.password
        if password is not None:
            setting["password"] = seal_text(mkey, password, AAD_PASSWORD) if password else ""
        if ca is not None:
            setting["ca"] = ca
        if cert is not None:
            setting.update(client_cert=cert, client_key=seal_text(mkey, str(key),
                                                                  AAD_CLIENT_KEY))
        if setting["commands"]:
            have = old is not None and old.commands and old.command_key
            if have and not body.get("rotate_command_key", False):
                assert old is not None
                setting.update(command_key=old.command_key,
                               command_key_version=old.command_key_version)
            else:
                setting.update(command_key=seal_text(mkey, os.urandom(32).hex(),
                                                     AAD_COMMAND_KEY),
                               command_key_version=(old.command_key_version if old else 0) + 1)
        elif body.get("rotate_command_key", False):
            raise BadRequest("--rotate-command-key needs --commands", "rotate_command_key")
        await self.ctx.propose({"op": "mqtt_set", "setting": setting, "now": time.time(),
                                "version": old.version if old is not None else 0})
        return self.show()

    async def unset(self) -> dict[str, Any]:
        self.ctx.require_manager()
        res = await self.ctx.propose({"op": "mqtt_unset"})
        return {"removed": bool(res.get("removed"))}

    def command_key(self) -> dict[str, Any]:
        """The HMAC key publishers sign scale commands with (managers: they can unseal)."""
        self.ctx.require_manager()
        s = self._setting()
        if s is None or not s.commands or not s.command_key:
            raise NotFound("MQTT commands are off: `shoal mqtt set … --commands`", "commands")
        key = unseal_text(self.security.manager_key(), s.command_key, AAD_COMMAND_KEY)
        return {"command_key": key, "command_key_version": s.command_key_version,
                "topic": f"{self.show()['topics']}/cmd/service/NAME/scale"}

    def credentials(self, peer: Any) -> dict[str, Any]:
        """Manager side of a member's fetch: the unsealed password and client key (never the
        command key: only the leader, a manager, checks commands)."""
        self.ctx.require_manager()
        self.security.authorize(peer)
        s = self._setting()
        if s is None:
            raise NotFound("no cluster-wide MQTT setting", "mqtt")
        mkey = self.security.manager_key()
        return {"version": s.version,
                "password": unseal_text(mkey, s.password, AAD_PASSWORD) if s.password else "",
                "client_key": unseal_text(mkey, s.client_key, AAD_CLIENT_KEY)
                if s.client_key else ""}

    async def config_of(self, s: MqttSetting, base: MqttConfig) -> MqttConfig:
        """The bridge's config for setting ``s``: unsealed here on a manager, fetched from a
        manager on a worker (Unavailable if none answers: the caller retries)."""
        creds: dict[str, Any]
        command_key = b""
        mkey = b""
        with contextlib.suppress(ApiError):  # (a worker: NotManager)
            mkey = self.security.manager_key()
        if mkey:
            creds = {"password": unseal_text(mkey, s.password, AAD_PASSWORD)
                     if s.password else "",
                     "client_key": unseal_text(mkey, s.client_key, AAD_CLIENT_KEY)
                     if s.client_key else ""}
            if s.commands and s.command_key:
                command_key = unseal_text(mkey, s.command_key, AAD_COMMAND_KEY).encode()
        elif s.password or s.client_key:
            creds = await self._fetch()
        else:
            creds = {"password": "", "client_key": ""}
        return dataclasses.replace(
            base, url=s.url, topic_prefix=s.topic_prefix, password=str(creds["password"]),
            password_file="", ca_file="", cert_file="", key_file="", command_key_file="",
            ca_pem=s.ca, cert_pem=s.client_cert, key_pem=str(creds["client_key"]),
            command_key=command_key)

    async def _fetch(self) -> dict[str, Any]:
        snap = self.ctx.require_member().snapshot()
        managers = sorted(n.api_addr for n in snap.nodes.values()
                          if n.role is NodeRole.MANAGER and n.state is not NodeState.DOWN)
        last: Exception = Unavailable("no manager to fetch the MQTT credentials from")
        for addr in managers:
            try:
                return await self.security.call(addr, "/v1/cluster/mqtt", {}, timeout=5.0)
            except ApiError as exc:
                last = exc
        raise last


class MqttSupervisor:
    """Runs this node's bridge: from the agent's ``--mqtt-*`` flags when it has a
    ``--mqtt-url`` (the flags win: that agent ignores the cluster-wide setting), else from
    the cluster-wide setting, followed live — a bridge starts when one is set, is replaced
    (cancelled, a new connection) when it changes, stops when it is unset; no agent restart.
    ``run()`` until cancelled; never raises."""

    def __init__(self, ctx: SettingContext, flags: MqttConfig, ring: EventLog,
                 registry: Any = None, update_service: UpdateService | None = None,
                 security: Peers | None = None, poll: float = 1.0,
                 idle: float = IDLE_LOOK) -> None:
        self.ctx = ctx
        self.flags = flags
        self.ring = ring
        self.update_service = update_service
        self.settings = MqttSettings(ctx, security) if security is not None else None
        self.poll = poll  # the least time between two looks at the setting
        self.idle = idle  # the most time between two looks when nothing is applied
        self._applied = asyncio.Event()  # an entry was applied since the last look
        self.bridge: MqttBridge | None = None
        # (cluster id, setting version, a manager?) of the bridge running now
        self.following: tuple[str, int, bool] | None = None
        self._task: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(MqttCollector(lambda: self.bridge))

    @property
    def enabled(self) -> bool:
        return self.flags.enabled

    async def run(self) -> None:
        try:
            if self.flags.enabled:
                log.info("mqtt: this agent's --mqtt-url wins over any cluster-wide setting")
                await self._start(self.flags)
                assert self._task is not None
                await self._task
                return
            warned: tuple[str, int, bool] | None = None
            while True:
                looked = time.monotonic()
                store = self.ctx.store
                ident = self.ctx.identity
                setting = store.snapshot().cluster.mqtt if store is not None and \
                    ident is not None else None
                # (a promoted worker rebuilds its bridge: a manager's holds the command key)
                want = (ident.cluster_id, setting.version, self.ctx.raft is not None) \
                    if ident is not None and setting is not None else None
                if want != self.following:
                    await self._stop()
                    if setting is not None and self.settings is not None:
                        try:
                            config = await self.settings.config_of(setting, self.flags)
                            config.validate()
                        except Exception as exc:  # (Unavailable: no manager answered, …)
                            level = logging.DEBUG if warned == want else logging.WARNING
                            warned = want
                            log.log(level, "mqtt: cannot use the cluster-wide setting v%d "
                                    "yet: %s (retrying)", setting.version, exc,
                                    exc_info=not isinstance(exc, ApiError | SealError |
                                                            ValueError | OSError))
                            await asyncio.sleep(2.0)
                            continue
                        log.info("mqtt: following the cluster-wide setting v%d",
                                 setting.version)
                        await self._start(config)
                    self.following = want
                # (a look copies the state's maps: not at every apply of a busy cluster)
                await after_applied(self._applied, looked, self.poll, self.idle)
        finally:
            await self._stop()

    def wake(self) -> None:
        """An entry was applied: the setting may have changed (the agent calls this)."""
        self._applied.set()

    async def _start(self, config: MqttConfig) -> None:
        self.bridge = MqttBridge(self.ctx, config, self.ring, None, self.update_service)
        self._task = asyncio.create_task(self.bridge.run(), name="mqtt-bridge")

    async def _stop(self) -> None:
        task, bridge = self._task, self.bridge
        self._task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if bridge is not None:
            bridge.close()
            log.info("mqtt: bridge to %s stopped", bridge.broker_label)
        self.bridge = None
        self.following = None

__all__ = ["MqttSettings", "MqttSupervisor"]
