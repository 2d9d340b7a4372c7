"""Compose files → what `shoal stack deploy` creates: service specs, secrets, configs.

Owns: reading Compose files (YAML through PyYAML's safe loader, with YAML 1.2 scalars: ``80:80``
stays a string, ``yes`` is not a boolean), merging override files, variable interpolation
(``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
``${VAR?error}``, ``${VAR:+alt}``, ``$$``) from the environment and the ``.env`` file beside the
first file (the environment wins, as in Compose; Swarm ignores ``.env``: moby/moby#29133), and
the translation of the Compose Specification, as Swarm reads it, into ``ServiceSpec`` records
validated by the same code as the API (``shoal.raft.validate.validate_spec``). Pure functions of
the files and an environment: no API calls, no output. Must not touch: the cluster (that is
shoal.cli.stack), the spec's declarations (shoal.raft.spec).

The reading of the text (YAML, ``.env``, interpolation, merging) is in shoal.cli.compose_env,
``extends:`` in shoal.cli.compose_extends;
the value readers and per-key handlers are in shoal.cli.compose_keys; this module holds the
table that maps keys to handlers, the top-level objects and the translation of a whole file.

Every service key (dotted, under ``services.NAME``) has one entry in ``KEYS``: a handler that
writes the spec, a section whose sub-keys are looked up in the same table, or a rule that
warns — ``IGNORED`` (does not apply to a stack, Swarm ignores it too; a key docker stack
deploy refuses is said to be refused there) or ``NOT_YET`` (Swarm reads it; shoal's spec has
no field for it yet). Wiring a new spec field is replacing its
``NOT_YET`` entry with a handler. A key outside the Compose Specification is an error, ``x-*``
extension keys are skipped. Each warning names the key once, with the services that use it.
A service's ``build:`` is read by shoal.cli.compose_build into ``Stack.builds`` (the deploy
builds them); until built, such a service's image is the build's name.

Names, as Swarm's: services ``STACK_SERVICE``, volumes declared in the file ``STACK_KEY``
(unless ``external`` or ``name:``); beyond Swarm, secrets and configs the file creates are
``STACK_KEY-DIGEST`` (the first hex digits of their content's sha256; unless ``external`` or
``name:``), so a changed file is a new object and a rolling update of the services using it
(the file name a task sees, the target, does not change); everything carries the label
``com.docker.stack.namespace=STACK``.

Errors (drawn in shoal.cli.errors): ``ComposeError`` (a CliError) when the file cannot be read,
parsed, interpolated or translated; the message starts with the path of the offending value
(``services.web.deploy.replicas: expected an integer, got 'three'``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.cli import compose_pod
from shoal.cli.compose_build import BuildSpec, placeholder_body, read_build
from shoal.cli.compose_env import interpolate, merge, parse_yaml, read_env_file
from shoal.cli.compose_extends import resolve_extends
from shoal.cli.compose_keys import (  # noqa: F401 (IGNORED, NOT_YET: re-exported)
    IGNORE,
    IGNORED,
    LATER,
    NOT_YET,
    SECTION,
    FileObject,
    Rule,
    _caps,
    _command,
    _deploy_mode,
    _endpoint_mode,
    _entrypoint,
    _env_file,
    _environment,
    _expose,
    _extra_hosts,
    _file_refs,
    _health_test,
    _image,
    _init,
    _logging,
    _network_mode,
    _only,
    _ports,
    _preferences,
    _restart,
    _restart_condition,
    _security_opt,
    _Service,
    _service_networks,
    _stop_signal,
    _tmpfs,
    _to,
    _ulimits,
    _volumes,
    _Warnings,
    _x_autoscale,
    _x_http,
    _x_tcp,
    as_bool,
    as_duration,
    as_float,
    as_int,
    as_labels,
    as_map,
    as_size,
    as_str,
    as_str_list,
)
from shoal.cli.errors import ComposeError
from shoal.raft.errors import ValidationError
from shoal.raft.spec import ServiceSpec
from shoal.raft.validate import validate_spec
from shoal.runtime.errors import VolumeOptionError
from shoal.runtime.volumes import check as volumes_check

# The label Swarm puts on everything a stack owns; node/mesh.py reads the same string to
# resolve a stack's short service names (a test checks they agree).
STACK_LABEL = "com.docker.stack.namespace"
# A stack's name: lower-case letters, digits and '-' (no '_': NAME_SERVICE must split at the
# first '_'); short enough that NAME_SERVICE stays a valid service name.
STACK_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
# hex digits of the content's sha256 in the name of a stack's secret/config (STACK_KEY-DIGEST)
CONTENT_DIGEST_LEN = 10

# ----------------------------------------------------------------------------- results

@dataclass
class NetworkObject:
    """A network of the stack (top-level ``networks:``): created unless ``external``."""

    key: str  # its key in the file (what services name)
    name: str  # its name in the cluster
    external: bool = False
    internal: bool = False
    attachable: bool = False
    subnet: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    """A translated Compose file: what a deploy makes the cluster hold."""

    name: str
    services: list[ServiceSpec]
    secrets: list[FileObject]
    configs: list[FileObject]
    warnings: list[str]
    networks: list[NetworkObject] = field(default_factory=list)
    # the services' builds (build:), run by the deploy before it writes anything; until
    # then each such service's image is the build's name (compose_build)
    builds: list[BuildSpec] = field(default_factory=list)


def _update_rules(prefix: str, spec: str) -> dict[str, Rule]:
    return {
        f"{prefix}": SECTION,
        f"{prefix}.parallelism": _to(f"{spec}.parallelism", as_int),
        f"{prefix}.delay": _to(f"{spec}.delay", as_duration),
        f"{prefix}.failure_action": _to(f"{spec}.failure_action", as_str),
        f"{prefix}.monitor": _to(f"{spec}.monitor", as_duration),
        f"{prefix}.max_failure_ratio": _to(f"{spec}.max_failure_ratio", as_float),
        f"{prefix}.order": _to(f"{spec}.order", as_str),
    }


def _generic_resources(svc: _Service, v: Any, path: str) -> None:
    """``[{discrete_resource_spec: {kind: gpu, value: 1}}, ...]`` (docker stack deploy's;
    Compose names no other form) → the task's generic reservations, kind → count."""
    if not isinstance(v, list):
        raise ComposeError(path, "expected a list of {discrete_resource_spec: {kind: KIND, "
                           f"value: N}}}}, got {v!r}")
    out: dict[str, int] = {}
    for i, item in enumerate(v):
        at = f"{path}[{i}]"
        spec = item.get("discrete_resource_spec") if isinstance(item, dict) else None
        if not isinstance(item, dict) or set(item) != {"discrete_resource_spec"} or \
                not isinstance(spec, dict):
            raise ComposeError(at, "expected {discrete_resource_spec: {kind: KIND, value: N}}, "
                               f"got {item!r}")
        at += ".discrete_resource_spec"
        if set(spec) - {"kind", "value"} or "kind" not in spec or "value" not in spec:
            raise ComposeError(at, f"expected {{kind: KIND, value: N}}, got {spec!r}")
        kind = as_str(spec["kind"], f"{at}.kind")
        if kind.lower() in {k.lower() for k in out}:
            raise ComposeError(f"{at}.kind", f"kind {kind!r} is given twice")
        out[kind] = as_int(spec["value"], f"{at}.value")
    svc.set("task.resources.reservations.generic_resources", out, path)


def _domainname(svc: _Service, v: Any, path: str) -> None:
    """``domainname:``, joined onto the host name (``hostname: mail`` + ``domainname:
    example.com`` → the task's ``mail.example.com``, as Docker's container; cluster schema
    14)."""
    svc.domainname = as_str(v, path).strip(".")


def _unresolved(svc: _Service, v: Any, path: str) -> None:
    """``extends`` reaching the translation: a document not read by ``load`` (which resolves
    it); refused rather than deployed without the keys it would take."""
    raise ComposeError(path, "not resolved: read the files with compose.load, which merges "
                       "the service it extends")


def _docker_refuses(instead: str) -> Rule:
    """A key left out with a warning where docker stack deploy refuses the file."""
    return Rule(why=f"ignored: {instead} (docker stack deploy refuses the key)")


# The one table: every key of a Compose service, as Swarm reads it (dotted under the
# service). To wire a new spec field, replace its LATER entry with a handler.
KEYS: dict[str, Rule] = {
    "image": Rule(_image),
    "command": Rule(_command),
    "entrypoint": Rule(_entrypoint),
    "environment": Rule(_environment),
    "env_file": Rule(_env_file),
    "ports": Rule(_ports),
    "secrets": Rule(_file_refs("secret")),
    "configs": Rule(_file_refs("config")),
    "volumes": Rule(_volumes),
    "tmpfs": Rule(_tmpfs),
    "user": _to("task.container.user", as_str),
    "working_dir": _to("task.container.workdir", as_str),
    "hostname": _to("task.container.hostname", as_str),
    "stop_signal": Rule(_stop_signal),
    "stop_grace_period": _to("task.container.stop_grace_period", as_duration),
    "init": Rule(_init),
    "healthcheck": SECTION,
    "healthcheck.test": Rule(_health_test),
    "healthcheck.interval": _to("task.container.healthcheck.interval", as_duration),
    "healthcheck.timeout": _to("task.container.healthcheck.timeout", as_duration),
    "healthcheck.retries": _to("task.container.healthcheck.retries", as_int),
    "healthcheck.start_period": _to("task.container.healthcheck.start_period", as_duration),
    "healthcheck.start_interval": LATER,
    "healthcheck.disable": _to("task.container.healthcheck.disable", as_bool),
    # shoal's own probes (extension keys, ignored by other Compose tools)
    "healthcheck.x-http": Rule(_x_http),
    # pods (shoal's extension, Docker ignores it): cli/compose_pod.py
    "x-shoal-sidecars": Rule(compose_pod.containers("sidecars")),
    "x-shoal-autoscale": Rule(_x_autoscale),
    "x-shoal-init-containers": Rule(compose_pod.containers("init_containers")),
    "healthcheck.x-tcp": Rule(_x_tcp),
    "deploy": SECTION,
    "deploy.mode": Rule(_deploy_mode),
    "deploy.replicas": _to("mode.replicas", as_int),
    "deploy.labels": Rule(lambda svc, v, path: svc.set("labels", as_labels(v, path), path)),
    "deploy.endpoint_mode": Rule(_endpoint_mode),
    "deploy.resources": SECTION,
    "deploy.resources.limits": SECTION,
    "deploy.resources.limits.cpus": _to("task.resources.limits.cpu", as_float),
    "deploy.resources.limits.memory": _to("task.resources.limits.memory", as_size),
    "deploy.resources.limits.pids": _to("task.resources.limits.pids", as_int),
    "deploy.resources.reservations": SECTION,
    "deploy.resources.reservations.cpus": _to("task.resources.reservations.cpu", as_float),
    "deploy.resources.reservations.memory": _to("task.resources.reservations.memory",
                                                as_size),
    "deploy.resources.reservations.generic_resources": Rule(_generic_resources),
    "deploy.resources.reservations.devices": LATER,
    "deploy.restart_policy": SECTION,
    "deploy.restart_policy.condition": Rule(_restart_condition),
    "deploy.restart_policy.delay": _to("task.restart.delay", as_duration),
    "deploy.restart_policy.max_attempts": _to("task.restart.max_attempts", as_int),
    "deploy.restart_policy.window": _to("task.restart.window", as_duration),
    **_update_rules("deploy.update_config", "update"),
    **_update_rules("deploy.rollback_config", "rollback"),
    "deploy.placement": SECTION,
    "deploy.placement.constraints": _to("task.placement.constraints", as_str_list),
    "deploy.placement.preferences": Rule(_preferences),
    "deploy.placement.max_replicas_per_node": _to("task.placement.max_replicas", as_int),
    "labels": _to("task.container.labels", as_labels),  # (the container's: deploy.labels)
    "networks": Rule(lambda svc, v, path: _service_networks(svc, v, path)),
    "cap_add": Rule(_caps("cap_add")), "cap_drop": Rule(_caps("cap_drop")),
    "sysctls": _to("task.container.sysctls", as_labels), "ulimits": Rule(_ulimits),
    "extra_hosts": Rule(_extra_hosts), "read_only": _to("task.container.read_only", as_bool),
    "dns": _to("task.container.dns", as_str_list),
    "dns_search": _to("task.container.dns_search", as_str_list),
    "dns_opt": _to("task.container.dns_options", as_str_list),
    "logging": Rule(_logging),
    "tty": _to("task.container.tty", as_bool),
    "stdin_open": _to("task.container.stdin_open", as_bool),
    "isolation": LATER, "credential_spec": LATER,
    "group_add": _to("task.container.group_add", as_str_list), "domainname": Rule(_domainname),
    "shm_size": LATER, "mac_address": LATER, "platform": LATER,
    "oom_score_adj": _to("task.container.oom_score_adj", as_int),
    "privileged": LATER, "devices": LATER, "gpus": LATER, "annotations": LATER,
    "runtime": LATER, "storage_opt": LATER, "pid": LATER, "ipc": LATER, "uts": LATER,
    # Keys of the Compose Specification that do not apply to a stack: ignored as by docker
    # stack deploy ("Ignoring unsupported options") ...
    "build": Rule(lambda svc, v, path: None),  # (read by compose_build.read_build)
    "depends_on": IGNORE, "container_name": IGNORE, "links": IGNORE,
    "external_links": IGNORE, "network_mode": Rule(_network_mode), "restart": Rule(_restart),
    "security_opt": Rule(_security_opt), "userns_mode": IGNORE, "cgroup_parent": IGNORE,
    "profiles": Rule(lambda svc, v, path: None),  # (read by _with_active_profiles)
    "expose": Rule(_expose),
    "extends": Rule(_unresolved),  # (resolved by load: shoal.cli.compose_extends)
    # ... or ignored where docker stack deploy refuses the file (its schema has no such key,
    # or it names a replacement)
    **dict.fromkeys(("cgroup", "pull_policy", "develop", "attach", "blkio_config",
                     "cpu_count", "cpu_percent", "cpu_period", "cpu_rt_period",
                     "cpu_rt_runtime", "mem_swappiness", "oom_kill_disable",
                     "device_cgroup_rules", "label_file", "pre_start", "post_start",
                     "pre_stop", "provider", "use_api_socket", "driver_opts", "models"),
                    _docker_refuses("it does not apply to a stack")),
    **dict.fromkeys(("cpu_shares", "cpu_quota", "cpus", "cpuset", "mem_limit",
                     "mem_reservation", "memswap_limit", "pids_limit"),
                    _docker_refuses("give the limit under deploy.resources")),
    "scale": _docker_refuses("give the count as deploy.replicas"),
    "volumes_from": _docker_refuses("the service does not get the other's volumes: name "
                                    "them under its own volumes:"),
}


def _apply(svc: _Service, prefix: str, value: Any, path: str) -> None:
    """Every key of the mapping ``value`` (at table prefix ``prefix``) through its rule."""
    for key, v in as_map(value, path).items():
        dotted = f"{prefix}.{key}" if prefix else key
        where = f"{path}.{key}"
        rule = KEYS.get(dotted)
        if rule is None:
            if key.startswith("x-shoal-"):  # (shoal's own: a typo would be lost silently)
                raise ComposeError(where, "unknown shoal extension (shoal reads " + ", ".join(
                    k for k in KEYS if k.startswith("x-shoal-")) + ")")
            if key.startswith("x-"):
                continue
            raise ComposeError(where, "unknown key (not in the Compose Specification)")
        if rule.handle is not None:
            rule.handle(svc, v, where)
        elif rule.section:
            if v is not None:  # (``deploy:`` with nothing under it: the schema's null)
                _apply(svc, dotted, v, where)
        else:
            svc.warn(dotted, rule.why)


# where a spec field comes from, for errors the spec's own validation finds
_SPEC_TO_COMPOSE = {
    "name": "", "labels": "deploy.labels", "task.container.image": "image",
    "task.container.command": "command", "task.container.env": "environment",
    "task.container.workdir": "working_dir", "task.container.user": "user",
    "task.container.hostname": "hostname", "task.container.stop_signal": "stop_signal",
    "task.container.stop_grace_period": "stop_grace_period",
    "task.container.mounts": "volumes", "task.container.secrets": "secrets",
    "task.container.configs": "configs", "task.container.healthcheck": "healthcheck",
    "task.container.read_only": "read_only", "task.container.cap_add": "cap_add",
    "task.container.cap_drop": "cap_drop", "task.container.extra_hosts": "extra_hosts",
    "task.container.group_add": "group_add", "task.container.dns": "dns",
    "task.container.dns_search": "dns_search", "task.container.dns_options": "dns_opt",
    "task.container.ulimits": "ulimits", "task.container.sysctls": "sysctls",
    "task.container.log_driver": "logging.driver",
    "task.container.log_options": "logging.options",
    "task.container.tty": "tty", "task.container.stdin_open": "stdin_open",
    "task.container.oom_score_adj": "oom_score_adj", "task.container.labels": "labels",
    "task.container.seccomp": "security_opt",
    "task.resources.limits": "deploy.resources.limits",
    "task.resources.reservations": "deploy.resources.reservations",
    "task.restart": "deploy.restart_policy",
    "task.placement.constraints": "deploy.placement.constraints",
    "mode.replicas": "deploy.replicas", "update": "deploy.update_config",
    "rollback": "deploy.rollback_config", "endpoint.ports": "ports",
}


def _compose_path(svc: _Service, field_path: str) -> str:
    """The Compose path of a spec field named by a validation error."""
    best = ""
    for spec_path in sorted(set(_SPEC_TO_COMPOSE) | set(svc.spec_paths), key=len):
        if field_path == spec_path or field_path.startswith((spec_path + ".",
                                                            spec_path + "[")):
            best = spec_path
    if not best:
        return svc.path
    compose = svc.spec_paths.get(best) or f"{svc.path}.{_SPEC_TO_COMPOSE[best]}".rstrip(".")
    rest = field_path[len(best):]
    m = re.match(r"\[(\d+)\]", rest)
    if best == "task.container.mounts" and m and int(m.group(1)) < len(svc.mount_paths):
        # (volumes and tmpfs share the mounts list: name the entry that made the mount)
        return svc.mount_paths[int(m.group(1))]
    return compose + rest


def translate_service(stack: str, key: str, body: Any, project_dir: Path,
                      env: Mapping[str, str], objects: dict[str, dict[str, FileObject]],
                      volumes: dict[str, str], warnings: _Warnings,
                      networks: dict[str, str] | None = None,
                      volume_drivers: dict[str, tuple[str, dict[str, str]]] | None = None
                      ) -> ServiceSpec:
    """One ``services.KEY`` mapping → a validated ServiceSpec named ``STACK_KEY``."""
    path = f"services.{key}"
    svc = _Service(stack=stack, key=key, path=path, project_dir=project_dir, env=env,
                   objects=objects, volumes=volumes, warnings=warnings,
                   networks=networks or {}, volume_drivers=volume_drivers or {})
    if body is None:
        body = {}
    _apply(svc, "", body, path)
    if not svc.spec.get("task", {}).get("container", {}).get("image") and \
            not svc.spec.get("task", {}).get("container", {}).get("command"):
        raise ComposeError(f"{path}.image", "is required (without one, shoal runs "
                           "command: as a program of each node's own filesystem)")
    if svc.domainname:  # (Docker's container: HOSTNAME.DOMAINNAME; without a hostname:
        # KEY-SLOT, as shoal's default SERVICE-SLOT without the stack's name)
        c = svc.spec.setdefault("task", {}).setdefault("container", {})
        host = c.get("hostname") or re.sub(r"[._]", "-", key) + "-{{.Task.Slot}}"
        svc.set("task.container.hostname", f"{host}.{svc.domainname}", f"{path}.domainname")
    if svc.restart is not None and not any(p.startswith("task.restart.")
                                           for p in svc.spec_paths):
        for k, v in svc.restart.items():
            svc.set(f"task.restart.{k}", v, f"{path}.restart")
    name = f"{stack}_{key}"
    svc.set("name", name, path)
    labels = dict(svc.spec.get("labels") or {})
    labels[STACK_LABEL] = stack
    svc.spec["labels"] = labels
    if svc.env_files or svc.environment:
        svc.spec.setdefault("task", {}).setdefault("container", {})["env"] = {
            **svc.env_files, **svc.environment}
    if svc.mounts:
        svc.set("task.container.mounts", svc.mounts,
                svc.spec_paths.get("task.container.mounts", f"{path}.volumes"))
    container = svc.spec.get("task", {}).get("container", {})
    if svc.entrypoint is not None:
        if container.get("image"):  # ([] keeps the image's, as docker stack deploy)
            if svc.entrypoint:
                svc.set("task.container.entrypoint", svc.entrypoint, f"{path}.entrypoint")
        else:  # the host's root filesystem: the program is entrypoint + command
            svc.set("task.container.command",
                    svc.entrypoint + list(container.get("command", [])), f"{path}.entrypoint")
    if svc.spec.get("task", {}).get("network_mode") == "host":
        _host_ports(svc)
    health = container.get("healthcheck", {})
    if health.get("disable") and svc.health_test_given and \
            svc.spec_paths.get("task.container.healthcheck.disable", "").endswith(".disable"):
        raise ComposeError(f"{path}.healthcheck.disable", "test and disable cannot be set "
                           "at the same time (as docker stack deploy)")
    try:
        return validate_spec(svc.spec)
    except ValidationError as exc:
        where = _compose_path(svc, exc.field)
        msg = exc.message
        if msg.startswith(exc.field + ": "):
            msg = msg[len(exc.field) + 2:]
        value = _value_at(svc.spec, exc.field)
        if msg.startswith("invalid value: ") and isinstance(value, (str, int, float)):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            msg = f"invalid value {shown}: {msg[len('invalid value: '):]}"
        raise ComposeError(where, f"{msg} (spec field {exc.field})") from None


def _value_at(spec: Any, field_path: str) -> Any:
    """The value at ``task.container.mounts[1].source`` in the spec dict, or None."""
    node = spec
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", field_path):
        if part.startswith("["):
            i = int(part[1:-1])
            node = node[i] if isinstance(node, list) and i < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def _host_ports(svc: _Service) -> None:
    """``network_mode: host`` with ``ports: ["80:80"]``: the task listens on the node's port
    itself and Docker Compose discards such ports (with a warning); so does this. A port
    published on another number than its target goes through the routing mesh."""
    ports = svc.spec.get("endpoint", {}).get("ports")
    if not ports:
        return
    targets = {(p.get("target"), p.get("protocol", "tcp")) for p in ports}
    keep = [p for p in ports if (p.get("published"), p.get("protocol", "tcp")) not in targets]
    for p in ports:
        if p not in keep:
            svc.warn("ports", f"{p.get('published')}:{p.get('target')} with network_mode: "
                     "host is not published (the task listens on the node's port itself)")
    svc.spec["endpoint"]["ports"] = keep


# ----------------------------------------------------------------------------- the file

_TOP_KEYS = {"version", "name", "services", "networks", "volumes", "secrets", "configs",
             "include", "models"}


def _objects(stack: str, kind: str, section: Any, project_dir: Path, env: Mapping[str, str],
             warnings: _Warnings) -> dict[str, FileObject]:
    out: dict[str, FileObject] = {}
    for key, body in as_map(section or {}, f"{kind}s").items():
        path = f"{kind}s.{key}"
        m = as_map(body if body is not None else {}, path)
        known = {"file", "external", "name", "labels", "environment", "content", "driver",
                 "driver_opts", "template_driver"}
        for k in m:
            if k not in known and not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
        for k in ("driver", "driver_opts", "template_driver"):
            if k in m:
                warnings.add(f"{kind}s.{k}", f"{NOT_YET}: ignored")
        labels = as_labels(m.get("labels") or {}, f"{path}.labels")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            name = as_str(ext.get("name", m.get("name", key)), f"{path}.external.name")
            external = True
        else:
            external = as_bool(ext, f"{path}.external")
            name = as_str(m.get("name", key if external else f"{stack}_{key}"), f"{path}.name")
        versioned = not external and "name" not in m
        if external:
            out[key] = FileObject(kind, key, name, None)
            continue
        sources = [k for k in ("file", "environment", "content") if k in m]
        if len(sources) != 1 or (kind == "secret" and sources == ["content"]):
            allowed = "file: or environment:" if kind == "secret" else \
                "file:, environment: or content:"
            raise ComposeError(path, f"give exactly one of {allowed} (or external: true)")
        src = sources[0]
        if src == "file":
            file = project_dir / as_str(m["file"], f"{path}.file")
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise ComposeError(f"{path}.file", f"cannot read {file}: "
                                   f"{exc.strerror}") from None
        elif src == "environment":
            var = as_str(m["environment"], f"{path}.environment")
            if var not in env:
                raise ComposeError(f"{path}.environment", f"the variable {var} is not set")
            data = env[var].encode()
        else:
            data = as_str(m["content"], f"{path}.content").encode()
        if versioned:  # (a secret is immutable: a new content is a new object)
            name = f"{name}-{hashlib.sha256(data).hexdigest()[:CONTENT_DIGEST_LEN]}"
        out[key] = FileObject(kind, key, name, data, {**labels, STACK_LABEL: stack},
                              versioned=versioned)
    return out


def _networks(stack: str, section: Any, warnings: _Warnings) -> dict[str, NetworkObject]:
    """The top-level ``networks:`` → the stack's networks (``STACK_KEY`` unless named or
    external), overlay networks of the cluster (shoal.node.overlay)."""
    out: dict[str, NetworkObject] = {}
    for key, body in as_map(section or {}, "networks").items():
        path = f"networks.{key}"
        m = as_map(body if body is not None else {}, path)
        known = {"driver", "driver_opts", "attachable", "enable_ipv6", "ipam", "internal",
                 "labels", "external", "name"}
        for k in m:
            if k not in known and not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
        driver = as_str(m.get("driver", "overlay"), f"{path}.driver")
        if driver == "bridge":  # (docker compose's default, written out in many files)
            warnings.add(f"{path}.driver: bridge", "deployed as overlay: a stack's network "
                         "spans the nodes its services run on (docker stack deploy refuses "
                         "the file)")
        elif driver != "overlay":
            raise ComposeError(f"{path}.driver", f"expected overlay (the only driver of a "
                               f"stack's networks; bridge is taken as overlay), got "
                               f"{driver!r}")
        for k in ("driver_opts", "enable_ipv6"):
            if k in m:
                warnings.add(f"networks.{k}", f"{NOT_YET}: ignored")
        if isinstance(m.get("driver_opts"), dict) and "encrypted" in m["driver_opts"]:
            warnings.add("networks.driver_opts.encrypted", "not supported: the traffic of "
                         "this overlay between nodes is NOT encrypted (VXLAN in the clear)")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            out[key] = NetworkObject(key, as_str(ext.get("name", m.get("name", key)),
                                                 f"{path}.external.name"), external=True)
            continue
        if as_bool(ext, f"{path}.external"):
            out[key] = NetworkObject(key, as_str(m.get("name", key), f"{path}.name"),
                                     external=True)
            continue
        subnet = ""
        ipam = as_map(m.get("ipam") or {}, f"{path}.ipam")
        configs = ipam.get("config") or []
        if not isinstance(configs, list):
            raise ComposeError(f"{path}.ipam.config", "expected a list of {subnet: CIDR}")
        if configs:
            first = as_map(configs[0], f"{path}.ipam.config[0]")
            subnet = as_str(first.get("subnet", ""), f"{path}.ipam.config[0].subnet")
            if len(configs) > 1 or set(first) - {"subnet"}:
                warnings.add("networks.ipam", f"{NOT_YET}: only the first subnet is used")
        labels = as_labels(m.get("labels") or {}, f"{path}.labels")
        labels[STACK_LABEL] = stack
        out[key] = NetworkObject(
            key, as_str(m.get("name", f"{stack}_{key}"), f"{path}.name"),
            internal=as_bool(m.get("internal", False), f"{path}.internal"),
            attachable=as_bool(m.get("attachable", False), f"{path}.attachable"),
            subnet=subnet, labels=labels)
    return out


def _volume_names(stack: str, section: Any, warnings: _Warnings
                  ) -> tuple[dict[str, str], dict[str, tuple[str, dict[str, str]]]]:
    """The top-level ``volumes:`` → (key → the volume's name in the cluster, name →
    (driver, driver_opts) that its mounts carry: ``driver: local`` with ``driver_opts:
    {type: nfs, o: addr=…, device: :/export}``, or ``sshfs``, as ``--mount volume-opt=``)."""
    out: dict[str, str] = {}
    drivers: dict[str, tuple[str, dict[str, str]]] = {}
    for key, body in as_map(section or {}, "volumes").items():
        path = f"volumes.{key}"
        m = as_map(body if body is not None else {}, path)
        for k in m:
            if k not in ("external", "name", "driver", "driver_opts", "labels") and \
                    not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
            if k == "labels":
                warnings.add(f"volumes.{k}", f"{NOT_YET}: ignored")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            out[key] = as_str(ext.get("name", m.get("name", key)), f"{path}.external.name")
        elif as_bool(ext, f"{path}.external"):
            out[key] = as_str(m.get("name", key), f"{path}.name")
        else:
            out[key] = as_str(m.get("name", f"{stack}_{key}"), f"{path}.name")
        if "driver" in m or "driver_opts" in m:
            opts = {as_str(k, f"{path}.driver_opts"): str(v) if isinstance(v, (int, float))
                    else as_str(v, f"{path}.driver_opts.{k}")
                    for k, v in as_map(m.get("driver_opts") or {},
                                       f"{path}.driver_opts").items()}
            driver = as_str(m.get("driver") or "local", f"{path}.driver")
            try:
                volumes_check(driver, opts)
            except VolumeOptionError as exc:
                where = f"{path}.driver_opts" if "opt" in exc.field else f"{path}.driver"
                raise ComposeError(where, str(exc)) from None
            drivers[out[key]] = (driver, opts)
    return out, drivers


def load(paths: list[Path], environ: Mapping[str, str] | None = None,
         interpolation: bool = True
         ) -> tuple[dict[str, Any], Path, dict[str, str], list[str]]:
    """Read, interpolate, resolve each file's ``extends`` (shoal.cli.compose_extends) and
    merge the files: (document, project directory, the environment used, warnings). The
    project directory is the first file's; its ``.env`` gives variables the environment
    does not set. ``interpolation`` False: ``${VAR}`` left as written
    (`stack config --skip-interpolation`)."""
    if not paths:
        raise ComposeError("", "no Compose file given (-c FILE)")
    project_dir = paths[0].resolve().parent
    env: dict[str, str] = {}
    dotenv = project_dir / ".env"
    if dotenv.is_file():
        env.update(read_env_file(dotenv, str(dotenv),
                                 os.environ if environ is None else environ))
    env.update(os.environ if environ is None else environ)
    warnings: list[str] = []
    doc: dict[str, Any] = {}
    for p in paths:
        try:
            text = (p.read_text() if str(p) != "-" else _stdin())
        except OSError as exc:
            raise ComposeError(str(p), f"cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ComposeError(str(p), "not UTF-8 text") from None
        one = parse_yaml(text, str(p))
        for k in one:
            if k not in _TOP_KEYS and not str(k).startswith("x-"):
                raise ComposeError(str(k), "unknown top-level key (not in the Compose "
                                   "Specification)")
        one = {k: v for k, v in one.items() if not str(k).startswith("x-")}
        if interpolation:
            one = interpolate(one, env, warnings)
        one = resolve_extends(one, str(p), project_dir, (lambda body, at: interpolate(
            body, env, warnings, at)) if interpolation else None)
        doc = merge(doc, one)
    return doc, project_dir, env, list(dict.fromkeys(warnings))


def _stdin() -> str:
    import sys
    return sys.stdin.read()


def translate(stack: str, doc: dict[str, Any], project_dir: Path, env: Mapping[str, str],
              warnings: list[str] | None = None) -> Stack:
    """An interpolated, merged document → the Stack (every spec validated), or the first
    ComposeError."""
    if not STACK_NAME_RE.match(stack):
        raise ComposeError("", f"stack name {stack!r} is invalid: use 1-32 lower-case "
                           "letters, digits and '-'")
    w = _Warnings()
    w.plain.extend(warnings or [])
    if "include" in doc:
        w.add("include", NOT_YET)
    services = as_map(doc.get("services") or {}, "services")
    if not services:
        raise ComposeError("services", "the file defines no service")
    seen: dict[str, str] = {}
    for key in map(str, services):
        if (first := seen.setdefault(key.lower(), key)) != key:
            raise ComposeError(f"services.{key}", f"the same name as services.{first} but "
                               "for its case: a service's name is unique whatever its case")
    services = _with_active_profiles(services, env, w)
    objects = {kind: _objects(stack, kind, doc.get(f"{kind}s"), project_dir, env, w)
               for kind in ("secret", "config")}
    volumes, volume_drivers = _volume_names(stack, doc.get("volumes"), w)
    networks = _networks(stack, doc.get("networks"), w)
    services = _default_network(stack, services, networks)
    names = {k: n.name for k, n in networks.items()}
    builds = []
    for key, body in list(services.items()):
        if isinstance(body, dict) and "build" in body:
            builds.append(read_build(stack, str(key), body, project_dir, env, w,
                                     objects["secret"]))
            services[key] = placeholder_body(builds[-1], body)
    specs = [translate_service(stack, str(key), body, project_dir, env, objects, volumes, w,
                               names, volume_drivers) for key, body in services.items()]
    # a secret only builds use is given to the builds, never created in the cluster
    build_only = {k for b in builds for k in b.secret_sources} - _service_secret_keys(services)
    return Stack(name=stack, services=specs,
                 secrets=[o for k, o in objects["secret"].items() if k not in build_only],
                 configs=list(objects["config"].values()), warnings=w.render(),
                 networks=list(networks.values()), builds=builds)


def _service_secret_keys(services: Mapping[str, Any]) -> set[str]:
    """The top-level secrets the services' own ``secrets:`` name (short or long form)."""
    out: set[str] = set()
    for body in services.values():
        refs = body.get("secrets") if isinstance(body, dict) else None
        for ref in refs if isinstance(refs, list) else []:
            out.add(str(ref.get("source")) if isinstance(ref, dict) else str(ref))
    return out


def _with_active_profiles(services: dict[str, Any], env: Mapping[str, str],
                          w: _Warnings) -> dict[str, Any]:
    """The services to deploy, as `docker compose up` starts them: one without
    ``profiles:`` always, one with them only when one is active — named by
    ``COMPOSE_PROFILES`` (comma-separated, ``*`` all) in the environment or ``.env``."""
    active = {p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()}
    out = {}
    for key, body in services.items():
        if isinstance(body, dict) and "profiles" in body:
            names = as_str_list(body["profiles"], f"services.{key}.profiles")
            if "*" not in active and not active & set(names):
                w.add("profiles", "not deployed: none of their profiles is active "
                      "(COMPOSE_PROFILES, as docker compose)", str(key))
                continue
        out[key] = body
    if not out:
        raise ComposeError("services", "no service to deploy: every one has profiles: and "
                           "none of them is active (COMPOSE_PROFILES is "
                           f"{'not set' if not active else repr(','.join(sorted(active)))})")
    return out


def _default_network(stack: str, services: dict[str, Any],
                     networks: dict[str, NetworkObject]) -> dict[str, Any]:
    """Compose's ``default`` network, once the file names it: declared under ``networks:``
    (``default: {external: true, name: proxy}`` puts the stack on an existing network) or
    listed by a service. It is then a network of the stack (``STACK_default`` unless
    declared otherwise) and, as in Swarm, every service that lists no network joins it.
    A file that never names it keeps shoal's default: services on the cluster network."""
    named = "default" in networks or any(
        isinstance(body, dict) and isinstance(body.get("networks"), (list, dict))
        and "default" in body["networks"] for body in services.values())
    if not named:
        return services
    if "default" not in networks:
        networks["default"] = NetworkObject("default", f"{stack}_default",
                                            labels={STACK_LABEL: stack})
    out = {}
    for key, body in services.items():
        if isinstance(body, dict) and "networks" not in body and "network_mode" not in body:
            body = {**body, "networks": ["default"]}
        elif body is None:
            body = {"networks": ["default"]}
        out[key] = body
    return out


def load_stack(stack: str, paths: list[Path], environ: Mapping[str, str] | None = None
               ) -> Stack:
    """The files of `stack deploy -c FILE [-c OVERRIDE ...] STACK` → the Stack to deploy."""
    doc, project_dir, env, warnings = load(paths, environ)
    return translate(stack, doc, project_dir, env, warnings)


def label_of(obj: Mapping[str, Any]) -> str:
    """The stack an API object (its ``labels`` or ``spec.labels``) belongs to; "" if none."""
    labels = obj.get("labels") or (obj.get("spec") or {}).get("labels") or {}
    return str(labels.get(STACK_LABEL, ""))
