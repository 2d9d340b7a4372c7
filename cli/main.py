"""The `shoal` command line.

Owns: parsing arguments (the top-level parser, the ``_GROUPS`` table of command groups,
``command_group``; each group's sub-parsers are built in shoal.cli.parsers), talking to the
local agent's unix-socket API, and printing tables or JSON. `shoal agent` starts the agent
process itself. A user's mistake prints
one line (`Error: ...`) and exits non-zero, never a traceback. Must not touch: cluster
logic — every decision is the agent's; this module only asks and shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

# (only light modules here: every `shoal service ls` pays for what this imports. The command
# groups' modules are imported when a command of theirs runs or its parser is built (_OnUse
# below, and main() builds only the group argv names); the spec, msgspec, rich, http.client
# and the node's modules where a command needs them — tests/test_cli_shape.py checks the
# import set of `service ls|ps|inspect`, bench/cli_latency.py their time)
from shoal.cli import output
from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.cli.output import ago, emit, render_template, table
from shoal.cli.parsers import (
    _agent_parser,
    _ca_parser,
    _cluster_parsers,
    _events_parser,
    _gossip_parser,
    _image_parser,
    _node_parser,
    _Parser,
    _secret_parsers,
    _service_parser,
    _Version,
)


class _OnUse:
    """A module of the CLI imported at the first use of one of its attributes."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


# typing.TYPE_CHECKING without importing typing (~2.5 ms a run; mypy knows the name): the
# annotations are never evaluated (PEP 563)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from shoal.cli import build as build_cli
    from shoal.cli import builder as builder_cli
    from shoal.cli import cp as cp_cli
    from shoal.cli import execcli, infotext, keys, mqtt, network, progress, stack, user, volume
    from shoal.cli import registry as registry_cli
    from shoal.cli import stats as stats_cli
else:
    build_cli, registry_cli = _OnUse("shoal.cli.build"), _OnUse("shoal.cli.registry")
    builder_cli, cp_cli = _OnUse("shoal.cli.builder"), _OnUse("shoal.cli.cp")
    keys, mqtt, network = _OnUse("shoal.cli.keys"), _OnUse("shoal.cli.mqtt"), \
        _OnUse("shoal.cli.network")
    progress, stack = _OnUse("shoal.cli.progress"), _OnUse("shoal.cli.stack")
    user, volume = _OnUse("shoal.cli.user"), _OnUse("shoal.cli.volume")
    execcli, infotext = _OnUse("shoal.cli.execcli"), _OnUse("shoal.cli.infotext")
    stats_cli = _OnUse("shoal.cli.stats")


__all__ = ["Client", "ago", "build_parser", "emit", "main", "render_template", "table"]

DEFAULT_HOST = "unix:///var/lib/shoal/shoal.sock"


# ----------------------------------------------------------------------------- output
def render_nodes(nodes: list[dict[str, Any]]) -> str:
    return output.render(nodes, "node")


def render_services(svcs: list[dict[str, Any]]) -> str:
    return output.render(svcs, "service")


def render_tasks(tasks: list[dict[str, Any]]) -> str:
    return output.render(tasks, "task")


def parse_kv(items: Sequence[str], flag: str) -> dict[str, str]:
    from shoal.cli.flagvalues import parse_kv as parse

    return parse(items, flag)


# ----------------------------------------------------------------------------- commands
def cmd_agent(args: argparse.Namespace) -> None:
    import logging
    from pathlib import Path

    from shoal.node.agent import run_agent
    from shoal.node.config import AgentConfig
    from shoal.node.events import EventsConfig
    from shoal.node.mqttconfig import MqttConfig
    from shoal.raft.store import RaftConfig
    from shoal.runtime.registry import RegistryConfig

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AgentConfig(data_dir=Path(args.data_dir), advertise_addr=args.advertise_addr,
                      listen_addr=args.listen_addr, api_port=args.api_port,
                      raft_port=args.raft_port, remote_api_port=args.remote_api_port,
                      gossip_port=args.gossip_port, gossip_preset=args.gossip_preset,
                      cgroup_parent=args.cgroup_parent,
                      generic_resources=tuple(args.generic_resource),
                      raft=RaftConfig().scaled(args.raft_multiplier),
                      cert_lifetime=args.cert_lifetime,
                      cert_renew_fraction=args.cert_renew_fraction,
                      restart_grace=args.restart_grace, join_wait=args.join_wait,
                      metrics_addr=args.metrics_addr, metrics_mtls=args.metrics_mtls,
                      dashboard_addr=args.dashboard_addr, dashboard_tls=args.dashboard_tls,
                      events=EventsConfig(retained=args.events_retained),
                      registry=RegistryConfig(ca_file=args.registry_ca,
                                              insecure=tuple(args.insecure_registry)),
                      image_gc=registry_cli.image_gc_config(args),
                      mqtt=MqttConfig(url=args.mqtt_url, password_file=args.mqtt_password_file,
                                      ca_file=args.mqtt_ca, cert_file=args.mqtt_cert,
                                      key_file=args.mqtt_key,
                                      topic_prefix=args.mqtt_topic_prefix,
                                      keepalive=args.mqtt_keepalive,
                                      command_key_file=args.mqtt_command_key_file))
    try:
        cfg.validate()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if os.geteuid() != 0:
        raise CliError("the agent must run as root (it creates namespaces and cgroups)")
    try:
        run_agent(cfg, args.hostname)
    except OSError as exc:
        raise CliError(f"agent failed to start: {exc}") from None


def run(args: argparse.Namespace) -> None:
    if args.cmd == "agent":
        cmd_agent(args)
        return
    c = Client(args.host, tls_dir=args.tls_dir)
    c.stale = args.stale
    fmt = getattr(args, "format", "table")
    if args.cmd == "init":
        r = c.call("POST", "/v1/swarm/init", {"cluster_cidr": args.cluster_cidr,
                                              "default_addr_pool": args.default_addr_pool})
        print(f"Cluster initialised: this node ({r['node_id'][:12]}) is now a manager and the "
              "leader.")
        wt = c.call("GET", "/v1/swarm/join-token/worker")["token"]
        print("To add a worker, run on it:\n")
        print(f"    shoal join --token {wt} {_addr(c)}\n")
        print("To add a manager, run `shoal join-token manager` and follow the instructions.")
        if args.autolock:
            keys.enable_autolock(c)
    elif args.cmd == "join":
        c.timeout = max(c.timeout, 400.0)  # admission retries, then --join-wait (<= 300 s)
        r = c.call("POST", "/v1/swarm/join", {"token": args.token, "remote": args.remote})
        if r.get("catching_up"):
            print(f"This node was admitted to the cluster as a {r['role']} "
                  f"({r['node_id'][:12]}) and is catching up with the cluster's state in the "
                  "background (`shoal info` shows \"ready\": true once it has).")
        else:
            print(f"This node joined the cluster as a {r['role']} ({r['node_id'][:12]}).")
    elif args.cmd == "join-token":
        method = "POST" if args.rotate else "GET"
        tok = c.call(method, f"/v1/swarm/join-token/{args.role}")["token"]
        if args.quiet:
            print(tok)
        else:
            if args.rotate:
                print(f"Rotated the {args.role} join token: the old one no longer works.")
            print(f"To add a {args.role} to this cluster, run on it:\n")
            print(f"    shoal join --token {tok} {_addr(c)}\n")
    elif args.cmd == "leave":
        c.call("POST", "/v1/swarm/leave", {"force": args.force})
        print("This node left the cluster.")
    elif args.cmd == "info":
        info, shown = c.call("GET", "/v1/info"), infotext.choose(args.format, sys.stdout)
        print(json.dumps(info, indent=2) if shown == "json" else infotext.render(info)
              if shown == "text" else render_template(shown, info))
    elif args.cmd == "version":
        infotext.version(c, args.format)
    elif args.cmd == "node":
        run_node(c, args, fmt)
    elif args.cmd == "service":
        run_service(c, args, fmt)
    elif args.cmd == "image":
        run_image(c, args, fmt)
    elif args.cmd == "builder":
        builder_cli.run(c, args)
    elif args.cmd in ("secret", "config"):
        run_secret(c, args, fmt)
    elif args.cmd == "ca":
        run_ca(c, args)
    elif args.cmd == "events":
        run_events(c, args)
    elif args.cmd == "gossip":
        run_gossip(c, args, fmt)
    elif args.cmd == "stack":
        stack.run(c, args, fmt)
    elif args.cmd == "registry":
        registry_cli.run(c, args, fmt)
    elif args.cmd == "network":
        network.run(c, args, fmt, emit, table)
    elif args.cmd == "volume":
        volume.run(c, args, table)
    elif args.cmd == "mqtt":
        mqtt.run(c, args, fmt, emit)
    elif args.cmd in keys.COMMANDS:
        keys.run(c, args)
    elif args.cmd == "user":
        user.run(c, args, fmt)
    elif args.cmd == "stats":
        stats_cli.run(c, args)
    elif args.cmd == "cp":
        cp_cli.run(c, args)
    elif args.cmd == "exec":  # (the CLI exits with the command's exit status, as docker's)
        sys.exit(execcli.run(c, args))


def run_gossip(c: Client, args: argparse.Namespace, fmt: str) -> None:
    """`shoal gossip rotate-key`: the manager rolls a new key through every ready node."""
    if args.gossip_cmd == "rotate-key":
        r = c.call("POST", "/v1/gossip/rotate-key")
        emit(r, fmt, lambda r: (
            f"Gossip key rotated to {r['key']} on {len(r['nodes'])} nodes in {r['seconds']} s "
            f"(retired: {', '.join(r['old_keys']) or '-'})." +
            (f"\nSkipped (down): {', '.join(r['skipped'])}; they fetch the new key from a "
             "manager when they come back." if r["skipped"] else "")))


def _addr(c: Client) -> str:
    info = c.call("GET", "/v1/info")
    return f"{info['addr']}:{info['api_port']}"


def _pretty(kind: str) -> Callable[[dict[str, Any]], str]:
    from shoal.cli import pretty  # (only `inspect --pretty` needs it)
    return pretty.node if kind == "node" else pretty.service


def run_node(c: Client, args: argparse.Namespace, fmt: str) -> None:
    if args.node_cmd == "ls":
        output.show(c.call("GET", "/v1/nodes"), args, "node")
    elif args.node_cmd == "ps":
        output.show([t for n in args.nodes or ["self"]
                     for t in c.call("GET", f"/v1/nodes/{_q(n)}/tasks")], args, "task")
    elif args.node_cmd == "inspect":
        output.inspect(lambda n: c.call("GET", f"/v1/nodes/{_q(n)}"), args.nodes,
                       args.format, pretty=_pretty("node") if args.pretty else None)
    elif args.node_cmd == "update":
        body: dict[str, Any] = {}
        if args.availability:
            body["availability"] = args.availability
        if args.label_add:
            body["label_add"] = parse_kv(args.label_add, "--label-add")
        if args.label_rm:
            body["label_rm"] = list(args.label_rm)
        for item in args.generic_resource_add:
            if "=" not in item or not item.partition("=")[2]:
                raise CliError(f"--generic-resource-add expects KIND=VALUE, got {item!r}")
        if args.generic_resource_add:
            body["generic_resource_add"] = list(args.generic_resource_add)
        if args.generic_resource_rm:
            body["generic_resource_rm"] = list(args.generic_resource_rm)
        if args.role:
            body["role"] = args.role
        c.call("POST", f"/v1/nodes/{_q(args.node)}", body)
        print(args.node)
    elif args.node_cmd in ("promote", "demote"):
        for n in args.nodes:
            r = c.call("POST", f"/v1/nodes/{_q(n)}/{args.node_cmd}")
            if fmt == "json":
                print(json.dumps(r, indent=2))
            else:
                print(r["message"])
            if r.get("warning"):
                print(f"Warning: {r['warning']}", file=sys.stderr)
    elif args.node_cmd == "rm":
        def remove_node(n: str) -> None:
            c.call("DELETE", f"/v1/nodes/{_q(n)}" + ("?force=1" if args.force else ""))
            print(n)
        output.each(args.nodes, remove_node)


def run_image(c: Client, args: argparse.Namespace, fmt: str) -> None:
    if args.image_cmd in ("load", "import"):
        path = os.path.abspath(args.file)
        if not os.path.exists(path):
            raise CliError(f"no such file: {args.file}")
        body: dict[str, Any] = {"path": path}
        if args.image_cmd == "import":
            body["ref"] = args.ref
        for img in c.call("POST", "/v1/images", body):
            print(f"Loaded image {', '.join(img['tags']) or img['id']} ({img['id'][:19]})")
    elif args.image_cmd == "ls":
        output.show(c.call("GET", "/v1/images"), args, "image")
    elif args.image_cmd == "pull":
        registry_cli.run_pull(c, args, fmt)
    elif args.image_cmd == "inspect":
        output.inspect(lambda r: c.call("GET", f"/v1/images/{_q(r)}"), args.refs, args.format)
    elif args.image_cmd == "tag":
        registry_cli.run_tag(c, args)
    elif args.image_cmd == "push":
        registry_cli.run_push(c, args, fmt)
    elif args.image_cmd == "save":
        registry_cli.run_save(c, args)
    elif args.image_cmd == "prune":
        registry_cli.run_prune(c, args, fmt)
    elif args.image_cmd == "build":
        build_cli.run(c, args, fmt)
    elif args.image_cmd == "rm":
        def remove_image(ref: str) -> None:
            c.call("DELETE", f"/v1/images/{_q(ref)}")
            print(ref)
        output.each(args.refs, remove_image)


def run_service(c: Client, args: argparse.Namespace, fmt: str) -> None:
    sc = args.service_cmd
    if sc == "create":
        from shoal.cli import specflags

        spec = specflags.spec_from_create_args(args)
        r = _spec_call(c, "POST", "/v1/services",
                       registry_cli.service_body({"spec": spec}, args))
        registry_cli.print_warnings(r)
        print(r["id"], flush=True)
        if not args.detach:
            progress.wait(c, r["id"], "create", args)
    elif sc == "ls":
        output.show(c.call("GET", "/v1/services"), args, "service")
    elif sc == "ps":
        output.show([t for s in args.services
                     for t in c.call("GET", f"/v1/services/{_q(s)}/tasks")], args, "task")
    elif sc == "inspect":
        output.inspect(lambda s: c.call("GET", f"/v1/services/{_q(s)}"), args.services,
                       args.format, pretty=_pretty("service") if args.pretty else None)
    elif sc == "scale":
        pairs = []
        for item in args.pairs:
            name, sep, n = item.partition("=")
            if not sep or not name:
                raise CliError(f"scale expects SERVICE=REPLICAS, got {item!r}")
            if not (n.strip().isascii() and n.strip().isdigit()):
                raise CliError(f"invalid replica count {n!r} for {name}: must be a whole "
                               "number >= 0")
            pairs.append((name, int(n)))
        scaled: list[str] = []

        def scale(pair: str) -> None:
            name, n = pair.split("=")
            c.call("POST", f"/v1/services/{_q(name)}/scale", {"replicas": int(n)})
            print(f"{name} scaled to {n}", flush=True)
            scaled.append(name)
        failed: CliError | None = None
        try:
            output.each([f"{name}={n}" for name, n in pairs], scale)
        except CliError as exc:  # (waits for those that were scaled, as docker's)
            failed = exc
        if not args.detach:
            for name in scaled:
                progress.wait(c, name, "scale", args)
        if failed is not None:
            raise failed
    elif sc == "update" and not getattr(args, "rollback", False):
        from shoal.cli import specflags

        current = c.call("GET", f"/v1/services/{_q(args.service)}")
        spec = specflags.apply_update_args(current["spec"], args)
        r = _spec_call(c, "POST", f"/v1/services/{_q(args.service)}/update",
                       registry_cli.service_body({"spec": spec, "version": current["version"]},
                                                 args))
        registry_cli.print_warnings(r)
        print(r["name"], flush=True)
        if not args.detach:
            progress.wait(c, current["id"], "update", args, current.get("update_status"))
    elif sc == "logs":
        run_logs(c, args)
    elif sc == "rollback" or sc == "update":  # (`service update --rollback`: a rollback)
        current = c.call("GET", f"/v1/services/{_q(args.service)}")
        if sc == "update":
            from shoal.cli import specflags

            if specflags.apply_update_args(current["spec"], args) != current["spec"]:
                raise CliError("other flags may not be combined with --rollback (only -d, "
                               "-q): they would be dropped")
        r = c.call("POST", f"/v1/services/{_q(args.service)}/rollback")
        print(r["name"], flush=True)
        if not args.detach:
            progress.wait(c, current["id"], "rollback", args, current.get("update_status"))
    elif sc == "rm":
        def remove_service(s: str) -> None:
            c.call("DELETE", f"/v1/services/{_q(s)}")
            print(s)
        output.each(args.services, remove_service)


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: Unix seconds, an RFC 3339 / ISO 8601 time, or a Go duration before now
    (``10m``, ``1h30m``) → Unix seconds."""
    now = time.time() if now is None else now
    try:
        return float(text)
    except ValueError:
        pass
    import datetime

    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    except ValueError:
        pass
    from shoal.cli.flagvalues import parse_duration

    try:
        return now - parse_duration(text, "--since")
    except CliError:
        raise CliError(f"--since: expected a time (Unix seconds or 2006-01-02T15:04:05Z) or "
                       f"a duration before now (10m, 1h30m), got {text!r}") from None


def run_logs(c: Client, args: argparse.Namespace) -> None:
    """`service logs SERVICE|TASK`: a service's tasks merged, or one task's (its id, an id
    prefix or SERVICE.SLOT[.ID]: the manager tells them apart)."""
    import urllib.parse

    tail = str(args.tail).strip().lower()
    if tail != "all":  # (a negative number means all lines, as docker's)
        try:
            tail = "all" if int(tail) < 0 else str(int(tail))
        except ValueError:
            raise CliError(f"--tail: expected a number of lines or all, got {args.tail!r}"
                           ) from None
    query = {"tail": tail, "follow": int(args.follow), "timestamps": int(args.timestamps)}
    if args.container:
        query["container"] = args.container
    if args.since:
        query["since"] = repr(parse_since(args.since))
    width = 0
    for rec in c.stream(f"/v1/services/{_q(args.service)}/logs?"
                        f"{urllib.parse.urlencode(query)}"):
        sink = sys.stderr if rec.get("stream") == "stderr" else sys.stdout
        if args.raw:
            print(rec["line"], file=sink, flush=True)
            continue
        task_id = "" if args.no_task_ids else \
            "." + (rec["task"] if args.no_trunc else rec["task"][:12])
        prefix = f"{rec['name']}{task_id}@{rec['node']}"
        width = max(width, len(prefix))
        print(f"{prefix.ljust(width)} | {rec['line']}", file=sink, flush=True)


def _spec_call(c: Client, method: str, path: str, body: dict[str, Any]) -> Any:
    """A create/update call whose errors about a spec field also name the flag that sets it."""
    from shoal.cli import specflags

    try:
        return c.call(method, path, body)
    except CliError as exc:
        flag = specflags.flag_of_field(exc.field) if exc.field else ""
        if flag and flag not in str(exc):
            raise CliError(f"{exc} ({flag})", exc.field) from None
        raise


def run_secret(c: Client, args: argparse.Namespace, fmt: str) -> None:
    """`shoal secret|config create|ls|inspect|rm`. Values are read from a file or stdin and
    sent base64-encoded; they are never printed (a secret's value is never returned)."""
    kind = args.cmd
    sub = getattr(args, f"{kind}_cmd")
    if sub == "create":
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    data = f.read()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
        from shoal.raft.secops import MAX_FILE_BYTES

        if not data or len(data) > MAX_FILE_BYTES:  # (checked before the upload: a body past
            # the API's limit was cut off with "Broken pipe")
            raise CliError(f"a {kind} holds 1 byte to {MAX_FILE_BYTES // 1024} KiB, "
                           f"{args.file} has {len(data)} bytes")
        r = c.call("POST", f"/v1/{kind}s", {"name": args.name, "labels": parse_kv(
            args.label, "--label"), "data": _b64(data)})
        print(r["id"])
    elif sub == "ls":
        output.show(c.call("GET", f"/v1/{kind}s"), args, kind)
    elif sub == "inspect":
        output.inspect(lambda n: c.call("GET", f"/v1/{kind}s/{_q(n)}"), args.names,
                       args.format)
    elif sub == "rm":
        def remove(n: str) -> None:
            c.call("DELETE", f"/v1/{kind}s/{_q(n)}")
            print(n)
        output.each(args.names, remove)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def run_ca(c: Client, args: argparse.Namespace) -> None:
    """`shoal ca info|issue-client|revoke-client`. The client's key is made here and never
    leaves this machine; the manager signs a request for it."""
    if args.ca_cmd == "info":
        print(json.dumps(c.call("GET", "/v1/ca"), indent=2))
    elif args.ca_cmd == "issue-client":
        from pathlib import Path

        from shoal.node import pki

        out = Path(args.out)
        key = pki.new_key()
        body: dict[str, Any] = {"name": args.name, "csr": pki.make_csr(key).decode()}
        if args.days:
            body["lifetime"] = args.days * 86400.0
        if args.user:
            body["user"] = args.user
        r = c.call("POST", "/v1/ca/clients", body)
        try:
            out.mkdir(parents=True, exist_ok=True, mode=0o700)
            pki.write_private(out / "key.pem", pki.key_pem(key))
            pki.write_private(out / "cert.pem", r["cert"].encode(), 0o644)
            pki.write_private(out / "ca.pem", r["ca_cert"].encode(), 0o644)
        except OSError as exc:
            raise CliError(f"cannot write to {out}: {exc.strerror}") from None
        print(f"Client certificate {args.name!r} written to {out}/ (cert.pem, key.pem, "
              f"ca.pem); valid until {time.strftime('%Y-%m-%d', time.localtime(r['not_after']))}"
              f". Use: shoal -H tcp://MANAGER:PORT --tls-dir {out} ...")
    elif args.ca_cmd == "revoke-client":
        c.call("DELETE", f"/v1/ca/clients/{_q(args.name)}")
        print(f"Client certificate {args.name!r} revoked.")
    elif args.ca_cmd == "rotate":
        keys.run_ca_rotate(c, args)


def event_line(rec: dict[str, Any]) -> str:
    """``TIME TYPE ACTION ID (name=…, key=value, …)``, as `docker events` prints."""
    import datetime

    when = datetime.datetime.fromtimestamp(float(rec.get("time") or 0), datetime.UTC)
    attrs = {"name": rec.get("name", ""), **rec.get("attributes", {})}
    if rec.get("local"):
        attrs["local"] = True
    inner = ", ".join(f"{k}={v}" for k, v in attrs.items() if v not in ("", None))
    return (f"{when.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z {rec['type']} {rec['action']} "
            f"{rec.get('id') or '-'} ({inner})")


def run_events(c: Client, args: argparse.Namespace) -> None:
    import urllib.parse

    query: list[tuple[str, str]] = []
    if args.since:
        query.append(("since", args.since))
    if args.until:
        query.append(("until", args.until))
    query += [("filter", f) for f in args.filter]
    path = "/v1/events" + ("?" + urllib.parse.urlencode(query) if query else "")
    for rec in c.stream(path):
        if rec.get("type") == "gap":
            print(f"Warning: {rec['attributes']['message']}", file=sys.stderr, flush=True)
            if args.format != "json":
                continue
        if args.format == "json":
            out = json.dumps(rec)
        elif args.format:
            out = render_template(args.format, rec)
        else:
            out = event_line(rec)
        print(out, flush=True)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def _q(s: str) -> str:
    """``s`` as one path segment (urllib.parse's quote, imported only for other characters
    than a name's or id's: a `service ps NAME` need not pay for urllib.parse)."""
    if s and all(ch in _UNRESERVED for ch in s):
        return s
    from urllib.parse import quote

    return quote(s, safe="")


# ----------------------------------------------------------------------------- parser
# (each command group's builder and the lazy _Parser: shoal.cli.parsers)
def split_update_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`service update NAME [FLAGS] -- CMD ARGS`: (the arguments before ``--``, the command
    after it) — argparse cannot take a command after flags that follow NAME."""
    head = argv[:argv.index("--")] if "--" in argv else []
    if "service" not in head or head[head.index("service") + 1:][:1] != ["update"]:
        return argv, None
    i = len(head)
    return argv[:i], argv[i + 1:]


def build_parser(lazy: bool = False, only: str | None = None) -> argparse.ArgumentParser:
    """The `shoal` parser: every command's, or with ``only`` (a top-level command's name,
    see command_group) only the global options and that command's group. ``lazy`` (the
    CLI's own run): each sub-parser's options are made only when it is used (see _Parser);
    tests see them all at once."""
    if lazy and not hasattr(argparse._, "cache_info"):  # type: ignore[attr-defined]
        # argparse translates its own words ("options", "usage: ") through gettext, which
        # looks for message catalogs on disk on every call: twice per sub-parser, most of
        # the cost of building them. The same answers, cached, for this process.
        import functools

        argparse._ = functools.lru_cache(maxsize=None)(argparse._)  # type: ignore[attr-defined]
    _Parser.recording = lazy
    try:
        return _build_parser(only)
    finally:
        _Parser.recording = False


def _build_parser(only: str | None) -> argparse.ArgumentParser:
    p = _Parser(prog="shoal", description="shoal: a peer-to-peer container orchestrator")
    p.add_argument("-H", "--host", default=os.environ.get("SHOAL_HOST", DEFAULT_HOST),
                   help=f"agent socket, or tcp://ADDR:PORT for a remote API (env SHOAL_HOST, "
                   f"default {DEFAULT_HOST})")
    p.add_argument("--tls-dir", default=os.environ.get("SHOAL_TLS_DIR", ""), metavar="DIR",
                   help="client certificate for a tcp:// host: DIR/{ca,cert,key}.pem from "
                   "`shoal ca issue-client` (env SHOAL_TLS_DIR)")
    p.add_argument("--stale", action="store_true", help="read this manager's own copy of "
                   "the cluster state at once (may be stale) instead of confirming it through "
                   "the leader first (docs/reliability.md)")
    p.add_argument("--version", action=_Version, help="show shoal's version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for names, add in _GROUPS:
        if only is None or only in names:
            add(sub)
    return p


# The top-level commands, in `shoal --help`'s order: (names, what adds their parsers under
# the top-level sub-parsers). build_parser(only=NAME) builds only NAME's entry: main() passes
# the group argv names, so `shoal service ls` never builds (nor imports) the others.
_GROUPS: list[tuple[tuple[str, ...], Callable[[Any], None]]] = [
    (("agent",), _agent_parser),
    (("init", "join", "join-token", "leave", "info", "version"), _cluster_parsers),
    (("node",), _node_parser),
    (("service",), _service_parser),
    (("exec",), lambda sub: execcli.add_parser(sub)),
    (("cp",), lambda sub: cp_cli.add_parser(sub)),
    (("stats",), lambda sub: stats_cli.add_parser(sub)),
    (("events",), _events_parser),
    (("gossip",), _gossip_parser),
    (("ca",), _ca_parser),
    (("secret", "config"), _secret_parsers),
    (("image",), _image_parser),
    (("builder",), lambda sub: builder_cli.add_parser(sub)),
    (("registry",), lambda sub: registry_cli.add_parser(sub)),
    (("stack",), lambda sub: stack.add_parser(sub)),
    (("network",), lambda sub: network.add_parser(sub)),
    (("volume",), lambda sub: volume.add_parser(sub)),
    (("mqtt",), lambda sub: mqtt.add_parser(sub)),
    (("swarm", "unlock", "unlock-key"), lambda sub: keys.add_parser(sub)),  # keys.COMMANDS
    (("user",), lambda sub: user.add_parser(sub)),
]


def command_group(words: Sequence[str]) -> str | None:
    """The top-level command ``words`` (argv without the program) names: its first word
    after the global options, or None when that is not plain (no command, -h/--version
    first, an abbreviated or unknown option) — then the whole parser is built."""
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-H", "--host", "--tls-dir"):
            i += 2
        elif w == "--stale" or w.startswith(("--host=", "--tls-dir=")) or \
                (w.startswith("-H") and len(w) > 2):
            i += 1
        elif w.startswith("-"):
            return None
        else:
            return w if any(w in names for names, _ in _GROUPS) else None
    return None


def bool_values(words: list[str]) -> list[str]:
    """docker's (pflag's) ``--detach=false`` / ``--detach=true`` as argparse takes them:
    the flag, or nothing (its default); words after ``--`` (a task's command) untouched."""
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "--":
            return out + words[i:]
        flag, eq, value = word.partition("=")
        if eq and flag in _BOOL_VALUED and value.lower() in ("true", "1", "false", "0"):
            if value.lower() in ("true", "1"):
                out.append(flag)
            continue
        out.append(word)
    return out


_BOOL_VALUED = frozenset({"--detach", "--quiet", "--force", "--no-trunc"})


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    group = command_group(words)
    if group != "exec":  # (exec: the words after its TASK are the command's, untouched)
        words = bool_values(words)
    parser = build_parser(lazy=True, only=group)
    head, command = split_update_command(words)
    args = None
    if command is not None:
        args = parser.parse_args(head)
        if (args.cmd, getattr(args, "service_cmd", "")) == ("service", "update"):
            args.command = command
        else:  # ("update" was some other word): parse as given
            args = None
    if args is None:
        args = parser.parse_args(words)
    try:
        run(args)
    except CliError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
