"""Compose's pods: the ``x-shoal-sidecars`` and ``x-shoal-init-containers`` service keys.

Owns: translating these two extension keys of a Compose service into the spec's
``task.sidecars`` and ``task.init_containers`` (shoal.raft.podspec.SidecarSpec). Compose has
no pods (Kubernetes' word; Compose services are one container each), so shoal reads an
``x-`` extension that Docker ignores. Each item is a small Compose service::

    services:
      web:
        image: nginx
        volumes: [data:/data]
        x-shoal-init-containers:
          - name: migrate
            command: ["sh", "-c", "prepare-db"]
        x-shoal-sidecars:
          - name: metrics
            image: prom/exporter
            command: --port 9100
            environment: {TARGET: "http://127.0.0.1:80"}
            volumes: [/data]              # the service's mounts it sees too (by target)
            healthcheck: {test: "wget -qO- 127.0.0.1:9100", interval: 5s}
            restart_policy: {condition: any, delay: 1s}
            resources: {limits: {cpus: "0.1", memory: 32M}}

Keys: name, image, command, environment, working_dir, user, stop_signal, volumes,
healthcheck (test, interval, timeout, retries, start_period, disable, x-http, x-tcp),
restart_policy (condition, delay, max_attempts, window), resources.limits (cpus, memory,
pids). Any other key is an error naming it. Must not touch: the rest of the service (that is
shoal.cli.compose and compose_keys), the cluster.
"""

from __future__ import annotations

import shlex
from typing import Any

from shoal.cli.compose_keys import (
    Handler,
    _Service,
    as_bool,
    as_command,
    as_duration,
    as_float,
    as_int,
    as_labels,
    as_list,
    as_map,
    as_size,
    as_str,
    signal_word,
)
from shoal.cli.errors import ComposeError

_KEYS = ("name", "image", "command", "environment", "working_dir", "user", "stop_signal",
         "volumes", "healthcheck", "restart_policy", "resources")


def containers(kind: str) -> Handler:
    """The handler of ``x-shoal-sidecars`` (kind ``sidecars``) or ``x-shoal-init-containers``
    (``init_containers``)."""
    def handle(svc: _Service, v: Any, path: str) -> None:
        out = [_container(as_map(item, f"{path}[{i}]"), f"{path}[{i}]")
               for i, item in enumerate(as_list(v, path))]
        svc.set(f"task.{kind}", out, path)
    return handle


def _container(m: dict[str, Any], path: str) -> dict[str, Any]:
    for k in m:
        if k not in _KEYS and not str(k).startswith("x-"):
            raise ComposeError(f"{path}.{k}", f"unknown key (a container takes "
                               f"{', '.join(_KEYS)})")
    if "name" not in m:
        raise ComposeError(f"{path}.name", "is required (the container's name)")
    out: dict[str, Any] = {"name": as_str(m["name"], f"{path}.name")}
    if "image" in m:
        out["image"] = as_str(m["image"], f"{path}.image")
    if "command" in m:
        out["command"] = as_command(m["command"], f"{path}.command")
    if "environment" in m:
        out["env"] = as_labels(m["environment"], f"{path}.environment")
    if "working_dir" in m:
        out["workdir"] = as_str(m["working_dir"], f"{path}.working_dir")
    if "user" in m:
        out["user"] = as_str(m["user"], f"{path}.user")
    if "stop_signal" in m:
        out["stop_signal"] = signal_word(as_str(m["stop_signal"], f"{path}.stop_signal"))
    if "volumes" in m:  # "/data", or a service-style "data:/data[:ro]": the target counts
        vols = as_list(m["volumes"], f"{path}.volumes")
        out["mounts"] = [_target(as_str(x, f"{path}.volumes[{i}]")) for i, x in enumerate(vols)]
    if "healthcheck" in m:
        out["healthcheck"] = _health(as_map(m["healthcheck"], f"{path}.healthcheck"),
                                     f"{path}.healthcheck")
    if "restart_policy" in m:
        out["restart"] = _restart(as_map(m["restart_policy"], f"{path}.restart_policy"),
                                  f"{path}.restart_policy")
    if "resources" in m:
        res = as_map(m["resources"], f"{path}.resources")
        lim = as_map(res.get("limits", {}), f"{path}.resources.limits")
        out["limits"] = _pick(lim, f"{path}.resources.limits", {
            "cpus": ("cpu", as_float), "memory": ("memory", as_size), "pids": ("pids", as_int)})
    return out


def _target(text: str) -> str:
    parts = text.split(":")
    return parts[1] if len(parts) >= 2 and not text.startswith("/") else parts[0]


def _health(m: dict[str, Any], path: str) -> dict[str, Any]:
    out = _pick({k: v for k, v in m.items() if k != "test"}, path, {
        "interval": ("interval", as_duration), "timeout": ("timeout", as_duration),
        "retries": ("retries", as_int), "start_period": ("start_period", as_duration),
        "disable": ("disable", as_bool), "x-http": ("http", as_str), "x-tcp": ("tcp", as_int)})
    if "test" in m:
        v, where = m["test"], f"{path}.test"
        argv = [v] if isinstance(v, str) else as_command(v, where)
        if isinstance(v, str):
            out["command"] = v
        elif argv[:1] == ["NONE"]:
            out["disable"] = True
        elif argv[:1] == ["CMD"] and len(argv) > 1:
            out["command"] = shlex.join(argv[1:])
        elif argv[:1] == ["CMD-SHELL"] and len(argv) == 2:
            out["command"] = argv[1]
        else:
            raise ComposeError(where, "expected \"CMD-SHELL command\", [\"CMD\", ARGS...], "
                               f"[\"CMD-SHELL\", \"command\"] or [\"NONE\"], got {argv!r}")
    return out


def _restart(m: dict[str, Any], path: str) -> dict[str, Any]:
    out = _pick(m, path, {"condition": ("condition", as_str), "delay": ("delay", as_duration),
                          "max_attempts": ("max_attempts", as_int),
                          "window": ("window", as_duration)})
    if out.get("condition", "any") not in ("none", "on-failure", "any"):
        raise ComposeError(f"{path}.condition", f"expected none, on-failure or any, got "
                           f"{out['condition']!r}")
    return out


def _pick(m: dict[str, Any], path: str, table: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in m.items():
        if k not in table:
            raise ComposeError(f"{path}.{k}", f"unknown key (expected one of "
                               f"{', '.join(table)})")
        field, conv = table[k]
        out[field] = conv(v, f"{path}.{k}")
    return out
