"""The MQTT bridge's settings and its pure rules: what a ``--mqtt-*`` flag may hold, how long
to wait before a reconnect, what a failed connection was, how a scale command is signed.

Owns: ``MqttConfig`` (the ``--mqtt-*`` agent flags, also made from the cluster-wide setting by
shoal.node.mqtt.MqttSupervisor), ``backoff``, ``classify`` (the connection failure reasons
``REASONS`` and their log ``HINTS``), ``read_key`` and ``sign_scale`` (a command's HMAC). Pure:
no network, no cluster state; the agent's configuration (shoal.node.config) and the CLI import
this module alone, not the bridge. Must not touch: the connection (shoal.node.mqttbridge), the
cluster-wide setting (shoal.node.mqtt).

Credentials: the password comes from ``--mqtt-password-file`` (read at each connect; never in
the URL, the command line or a log line). TLS: ``mqtts://`` verifies the broker against
``--mqtt-ca`` (else the system's CAs) and its host name; ``--mqtt-cert``/``--mqtt-key`` present
a client certificate to brokers that require one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# why a connection failed or was lost (classify; shoal_mqtt_connect_failures_total{reason})
REASONS = ("refused", "tls", "bad_credentials", "not_authorized", "timeout", "dns", "lost",
           "acl", "error")


@dataclass
class MqttConfig:
    """The bridge's settings (agent flags ``--mqtt-*``)."""

    # Broker URL: mqtt://[USER@]HOST[:PORT] (plain, port 1883) or mqtts://… (TLS, 8883).
    # "" = no bridge (the default). A password in the URL is refused: use password_file.
    url: str = ""
    # File whose first line is USER's password (read at each connect, so it can be rotated).
    # "" = connect without a password.
    password_file: str = ""
    # PEM file of the CA(s) that signed the broker's certificate (mqtts); "" = system CAs.
    ca_file: str = ""
    # Client certificate and its key (PEM) for brokers that require one (mqtts only).
    cert_file: str = ""
    key_file: str = ""
    # Topic prefix; "" = shoal/ + the first 12 characters of the cluster id.
    topic_prefix: str = ""
    # MQTT keepalive, seconds (1-3600). The broker announces a dead node ("offline", its
    # last will) after 1.5 x this; lower = faster announcement, more idle pings.
    keepalive: int = 10
    # Reconnect back-off: the first retry after this many seconds, doubling (with ±20 %
    # jitter) up to backoff_max. A successful connect resets it.
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    # Seconds between writes of the retained event cursor while events flow (and once when
    # they stop). Lower = fewer repeats after a leader change, more broker writes.
    cursor_interval: float = 0.5
    # Least seconds between two scans of the cluster state for changed retained topics.
    state_interval: float = 0.2
    # Seconds a publish, subscribe or connect may take before the connection is dropped
    # and made again.
    timeout: float = 5.0
    # Opt-in commands over MQTT: a file holding the HMAC-SHA256 key (its bytes, at least 16)
    # a command must be signed with. "" = no commands (the leader subscribes to nothing).
    command_key_file: str = ""
    # The same, in memory, for a bridge made from the cluster-wide setting (``shoal mqtt
    # set``: MqttSupervisor fills them from the unsealed setting; never from a flag):
    # the password, PEM of the CA / client certificate / its key, the command key.
    password: str = ""
    ca_pem: str = ""
    cert_pem: str = ""
    key_pem: str = ""
    command_key: bytes = b""

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def commands(self) -> bool:
        """Whether scale commands are on (a key from a file or from the cluster)."""
        return bool(self.command_key_file or self.command_key)

    def key(self) -> bytes:
        """The HMAC key commands are checked with."""
        return self.command_key or read_key(self.command_key_file)

    def broker(self) -> tuple[bool, str, int, str]:
        """(tls, host, port, user) from ``url``; ValueError naming --mqtt-url."""
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"--mqtt-url: {exc}") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError("--mqtt-url must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("--mqtt-url has no broker host (mqtt[s]://[USER@]HOST[:PORT])")
        if parts.password is not None:
            raise ValueError("--mqtt-url must not contain a password: use "
                                  "--mqtt-password-file")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("--mqtt-url takes no path: set the topics with "
                                  "--mqtt-topic-prefix")
        return (parts.scheme == "mqtts", parts.hostname,
                port or DEFAULT_PORTS[parts.scheme], parts.username or "")

    def validate(self) -> None:
        if not self.enabled:
            return
        tls, _host, _port, user = self.broker()
        if self.password_file and not user:
            raise ValueError("--mqtt-password-file needs a user in --mqtt-url "
                                  "(mqtts://USER@HOST)")
        if (self.ca_file or self.cert_file or self.ca_pem or self.cert_pem) and not tls:
            raise ValueError("--mqtt-ca/--mqtt-cert need an mqtts:// --mqtt-url")
        if bool(self.cert_file or self.cert_pem) != bool(self.key_file or self.key_pem):
            raise ValueError("--mqtt-cert and --mqtt-key go together")
        for flag, path in (("--mqtt-command-key-file", self.command_key_file),
                           ("--mqtt-password-file", self.password_file),
                           ("--mqtt-ca", self.ca_file), ("--mqtt-cert", self.cert_file),
                           ("--mqtt-key", self.key_file)):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{flag}: cannot read {path}")
        prefix = self.topic_prefix
        if prefix and (any(c in prefix for c in "+#\0") or prefix.startswith("/")
                       or prefix.endswith("/")):
            raise ValueError("--mqtt-topic-prefix must be a topic without +, # or a "
                                  "leading/trailing /")
        if self.commands and len(self.key()) < 16:
            raise ValueError("--mqtt-command-key-file must hold at least 16 bytes")
        if not 1 <= self.keepalive <= 3600:
            raise ValueError("--mqtt-keepalive must be between 1 and 3600 seconds")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("mqtt backoff_min must be > 0 and <= backoff_max")
        if self.cursor_interval <= 0 or self.state_interval <= 0 or self.timeout <= 0:
            raise ValueError("mqtt cursor_interval, state_interval and timeout must "
                                  "be > 0")


def backoff(attempt: int, lo: float, hi: float, rand: Callable[[], float] = random.random
            ) -> float:
    """Seconds to wait before reconnect ``attempt`` (1, 2, …): lo·2^(attempt-1), at most hi,
    ±20 % jitter (so a cluster's nodes do not all reconnect at once after a broker restart)."""
    base = min(hi, lo * 2 ** max(0, min(attempt - 1, 30)))
    return float(base * (0.8 + 0.4 * rand()))


def classify(exc: BaseException) -> str:
    """One of REASONS for a failed or lost connection."""
    rc = getattr(exc, "rc", None)
    if rc is not None:
        value = getattr(rc, "value", rc)
        if value in (4, 134):
            return "bad_credentials"
        if value in (5, 135):
            return "not_authorized"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return "tls"
        if isinstance(cause, ConnectionRefusedError):
            return "refused"
        if isinstance(cause, socket.gaierror):
            return "dns"
        if isinstance(cause, TimeoutError):
            return "timeout"
        cause = cause.__cause__ or cause.__context__
    text = str(exc).lower()
    for needle, reason in (("refused", "refused"), ("certificate", "tls"), ("ssl", "tls"),
                           ("timed out", "timeout"), ("name or service", "dns"),
                           ("not authori", "not_authorized"), ("password", "bad_credentials")):
        if needle in text:
            return reason
    return "error"


HINTS = {  # reason → what to check (logged with it)
    "refused": "nothing listens there (is the broker running?)",
    "tls": "check --mqtt-ca and the broker's certificate (its name must match the URL host)",
    "bad_credentials": "check the user in --mqtt-url and --mqtt-password-file",
    "not_authorized": "the broker refused this user: check the user name, its password "
                      "(--mqtt-password-file) and the broker's password file",
    "timeout": "the broker did not answer in time",
    "dns": "the broker's host name does not resolve",
    "lost": "the connection dropped",
    "acl": "the broker's ACL denies this user the topic prefix",
    "error": "",
}


def read_key(path: str) -> bytes:
    """A command key file's bytes, without a trailing newline."""
    return Path(path).read_bytes().rstrip(b"\r\n")


def sign_scale(key: bytes, service: str, replicas: int, request_id: str,
               expires: int | None = None) -> str:
    """The HMAC a scale command carries: HMAC-SHA256(key, "scale\\nNAME\\nN\\nREQUEST_ID"),
    hex, with "\\nEXPIRES" appended when the command carries ``expires`` (Unix seconds).
    What a client computes too (e.g. ``openssl dgst -sha256 -hmac``)."""
    msg = f"scale\n{service}\n{replicas}\n{request_id}" + \
        (f"\n{expires}" if expires is not None else "")
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()

__all__ = ["DEFAULT_PORTS", "HINTS", "REASONS", "MqttConfig", "backoff", "classify", "read_key",
           "sign_scale"]
