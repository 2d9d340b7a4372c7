"""What an image says about how to run it: the records of an image's config and of a stored image.

Owns: ``ImageConfig`` (Docker's config keys: Entrypoint, Cmd, Env, WorkingDir, User,
Healthcheck, StopSignal, ExposedPorts, Labels, Volumes, Shell, Author; its JSON form is the
``config`` of a shoal image manifest, so ``to_json`` decides image ids: optional keys appear
only when set), ``ImageHealthcheck``, ``ImageInfo`` and Docker's rules for a service spec over
an image (``ImageConfig.apply``). Pure: no I/O. Must not touch: the image store's files
(shoal.runtime.images, which re-exports these names), registries, tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_NS = 1e-9


@dataclass(frozen=True)
class ImageHealthcheck:
    """An image's HEALTHCHECK (Docker's config ``Healthcheck``: ``Test`` is ``["CMD-SHELL",
    cmd]``, ``["CMD", arg...]`` or ``["NONE"]``; durations in nanoseconds, 0 = unset)."""

    test: tuple[str, ...] = ()
    interval: float = 0.0  # seconds
    timeout: float = 0.0
    retries: int = 0
    start_period: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"Test": list(self.test), "Interval": round(self.interval / _NS),
                "Timeout": round(self.timeout / _NS), "Retries": self.retries,
                "StartPeriod": round(self.start_period / _NS)}

    @classmethod
    def from_json(cls, raw: Any) -> ImageHealthcheck | None:
        """None when the config has no (usable) Healthcheck."""
        if not isinstance(raw, dict) or not isinstance(raw.get("Test"), list):
            return None

        def seconds(key: str) -> float:
            value = raw.get(key)
            return max(float(value), 0.0) * _NS if isinstance(value, (int, float)) else 0.0

        retries = raw.get("Retries")
        return cls(test=tuple(str(a) for a in raw["Test"]), interval=seconds("Interval"),
                   timeout=seconds("Timeout"),
                   retries=max(int(retries), 0) if isinstance(retries, int) else 0,
                   start_period=seconds("StartPeriod"))


def _exposed_ports(raw: Any) -> tuple[tuple[int, str], ...]:
    """Docker's ``ExposedPorts`` ({"8000/tcp": {}, "53/udp": {}}) → ((8000, "tcp"), ...);
    entries that are not PORT[/tcp|udp] are ignored."""
    out: list[tuple[int, str]] = []
    for key in raw if isinstance(raw, dict) else ():
        port, _, proto = str(key).partition("/")
        proto = proto.lower() or "tcp"
        if port.isdigit() and 1 <= int(port) <= 65535 and proto in ("tcp", "udp"):
            out.append((int(port), proto))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class ImageConfig:
    """What an image says about how to run it (Docker's config: Entrypoint, Cmd...)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    healthcheck: ImageHealthcheck | None = None  # the image's HEALTHCHECK, if any
    stop_signal: str = ""  # the image's STOPSIGNAL ("SIGQUIT", "15"); "" = unset
    # the image's EXPOSE ports as (port, "tcp"|"udp"): the service's VIP serves them too
    exposed_ports: tuple[tuple[int, str], ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # LABEL key=value (image build)
    # the image's VOLUME paths (Docker's ``Volumes``), sorted: each gets an anonymous volume
    # in a task that mounts nothing there (shoal.node.worker)
    volumes: tuple[str, ...] = ()
    # the image's SHELL (Docker's ``Shell``): the shell form's runner; () = /bin/sh -c
    shell: tuple[str, ...] = ()
    author: str = ""  # MAINTAINER's name (Docker's ``Author``); "" = unset

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd),
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "WorkingDir": self.workdir,
            "User": self.user,
        }
        # (the optional keys only when set: images without them keep their id)
        if self.healthcheck is not None:
            out["Healthcheck"] = self.healthcheck.to_json()
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        if self.exposed_ports:  # (likewise)
            out["ExposedPorts"] = {f"{p}/{proto}": {} for p, proto in self.exposed_ports}
        if self.labels:  # (likewise)
            out["Labels"] = dict(sorted(self.labels.items()))
        if self.volumes:  # (likewise)
            out["Volumes"] = {path: {} for path in self.volumes}
        if self.shell:  # (likewise)
            out["Shell"] = list(self.shell)
        if self.author:  # (likewise)
            out["Author"] = self.author
        return out

    @classmethod
    def from_json(cls, raw: Any) -> ImageConfig:
        raw = raw if isinstance(raw, dict) else {}
        env: dict[str, str] = {}
        for item in raw.get("Env") or ():
            key, sep, value = str(item).partition("=")
            if sep:
                env[key] = value
        return cls(
            entrypoint=tuple(str(a) for a in raw.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in raw.get("Cmd") or ()),
            env=env,
            workdir=str(raw.get("WorkingDir") or ""),
            user=str(raw.get("User") or ""),
            healthcheck=ImageHealthcheck.from_json(raw.get("Healthcheck")),
            stop_signal=_signal_name(raw.get("StopSignal")),
            exposed_ports=_exposed_ports(raw.get("ExposedPorts")),
            labels={str(k): str(v) for k, v in (raw.get("Labels") or {}).items()}
            if isinstance(raw.get("Labels"), dict) else {},
            volumes=tuple(sorted({str(k) for k in raw.get("Volumes") or {}}))
            if isinstance(raw.get("Volumes"), dict) else (),
            shell=tuple(str(a) for a in raw.get("Shell") or ())
            if isinstance(raw.get("Shell"), list) else (),
            author=str(raw.get("Author") or ""),
        )

    def apply(
        self,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        user: str = "",
        entrypoint: Sequence[str] | None = None,
    ) -> tuple[tuple[str, ...], dict[str, str], str, str]:
        """Docker's rules for a service spec over this image: (command, env, workdir, user).
        The command is ENTRYPOINT + (the spec's command, or CMD if it has none); overriding the
        entrypoint drops CMD. Env: the image's, then the spec's on top. Workdir and user: the
        spec's if set, else the image's. An empty command means the task has none to run."""
        ep = tuple(entrypoint) if entrypoint is not None else self.entrypoint
        args = tuple(command) if command else (self.cmd if entrypoint is None else ())
        return ep + args, {**self.env, **(env or {})}, workdir or self.workdir, user or self.user


@dataclass(frozen=True)
class ImageInfo:
    id: str  # "sha256:<hex>" of the manifest
    tags: tuple[str, ...]
    layers: tuple[str, ...]  # layer blob digests, bottom first
    size: int  # bytes of the layer blobs (as stored, compressed if they were)
    config: ImageConfig


_SIGNALS = {"1": "SIGHUP", "2": "SIGINT", "3": "SIGQUIT", "9": "SIGKILL", "10": "SIGUSR1",
            "12": "SIGUSR2", "15": "SIGTERM", "28": "SIGWINCH"}


def _signal_name(raw: Any) -> str:
    """An image's StopSignal as a name ("SIGQUIT"); numbers and "QUIT" are accepted."""
    if not isinstance(raw, str) or not raw:
        return ""
    name = _SIGNALS.get(raw.strip(), raw.strip().upper())
    return name if name.startswith("SIG") else f"SIG{name}"
