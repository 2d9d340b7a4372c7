"""The `shoal` command line.

Owns: parsing arguments, talking to the local agent's unix-socket API, and printing
tables or JSON. `shoal agent` starts the agent process itself. A user's mistake prints
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
    from typing import Any, NoReturn

    from shoal.cli import build as build_cli
    from shoal.cli import keys, mqtt, network, progress, stack, user, volume
    from shoal.cli import registry as registry_cli
else:
    build_cli, registry_cli = _OnUse("shoal.cli.build"), _OnUse("shoal.cli.registry")
    keys, mqtt, network = _OnUse("shoal.cli.keys"), _OnUse("shoal.cli.mqtt"), \
        _OnUse("shoal.cli.network")
    progress, stack = _OnUse("shoal.cli.progress"), _OnUse("shoal.cli.stack")
    user, volume = _OnUse("shoal.cli.user"), _OnUse("shoal.cli.volume")

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
    from shoal.cli.specflags import parse_kv as parse

    return parse(items, flag)


# ----------------------------------------------------------------------------- commands
def cmd_agent(args: argparse.Namespace) -> None:
    import logging
    from pathlib import Path

    from shoal.node.agent import run_agent
    from shoal.node.config import AgentConfig
    from shoal.node.events import EventsConfig
    from shoal.node.mqttconfig import MqttConfig
    from shoal.runtime.registry import RegistryConfig

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AgentConfig(data_dir=Path(args.data_dir), advertise_addr=args.advertise_addr,
                      listen_addr=args.listen_addr, api_port=args.api_port,
                      raft_port=args.raft_port, remote_api_port=args.remote_api_port,
                      gossip_port=args.gossip_port, gossip_preset=args.gossip_preset,
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
        print(json.dumps(c.call("GET", "/v1/info"), indent=2))
    elif args.cmd == "node":
        run_node(c, args, fmt)
    elif args.cmd == "service":
        run_service(c, args, fmt)
    elif args.cmd == "image":
        run_image(c, args, fmt)
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


def run_node(c: Client, args: argparse.Namespace, fmt: str) -> None:
    if args.node_cmd == "ls":
        output.show(c.call("GET", "/v1/nodes"), args, "node")
    elif args.node_cmd == "ps":
        output.show([t for n in args.nodes or ["self"]
                     for t in c.call("GET", f"/v1/nodes/{_q(n)}/tasks")], args, "task")
    elif args.node_cmd == "inspect":
        out = [c.call("GET", f"/v1/nodes/{_q(n)}") for n in args.nodes]
        print(json.dumps(out, indent=2))
    elif args.node_cmd == "update":
        body: dict[str, Any] = {}
        if args.availability:
            body["availability"] = args.availability
        if args.label_add:
            body["label_add"] = parse_kv(args.label_add, "--label-add")
        if args.label_rm:
            body["label_rm"] = list(args.label_rm)
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
        for n in args.nodes:
            c.call("DELETE", f"/v1/nodes/{_q(n)}" + ("?force=1" if args.force else ""))
            print(n)


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
    elif args.image_cmd == "prune":
        registry_cli.run_prune(c, args, fmt)
    elif args.image_cmd == "build":
        build_cli.run(c, args, fmt)
    elif args.image_cmd == "rm":
        for ref in args.refs:
            c.call("DELETE", f"/v1/images/{_q(ref)}")
            print(ref)


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
        out = [c.call("GET", f"/v1/services/{_q(s)}") for s in args.services]
        print(json.dumps(out, indent=2))
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
        for name, n in pairs:
            c.call("POST", f"/v1/services/{_q(name)}/scale", {"replicas": n})
            print(f"{name} scaled to {n}", flush=True)
        if not args.detach:
            for name, _ in pairs:
                progress.wait(c, name, "scale", args)
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
        r = c.call("POST", f"/v1/services/{_q(args.service)}/rollback")
        print(r["name"], flush=True)
        if not args.detach:
            progress.wait(c, current["id"], "rollback", args, current.get("update_status"))
    elif sc == "rm":
        for s in args.services:
            c.call("DELETE", f"/v1/services/{_q(s)}")
            print(s)


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
    from shoal.cli.specflags import parse_duration

    try:
        return now - parse_duration(text, "--since")
    except CliError:
        raise CliError(f"--since: expected a time (Unix seconds or 2006-01-02T15:04:05Z) or "
                       f"a duration before now (10m, 1h30m), got {text!r}") from None


def _task_owner(c: Client, ref: str) -> tuple[str, str] | None:
    """(service id, task id) of the task whose id starts with ``ref``, if exactly one."""
    found = [(s["id"], t["id"]) for s in c.call("GET", "/v1/services")
             for t in c.call("GET", f"/v1/services/{_q(s['id'])}/tasks")
             if t["id"].startswith(ref)]
    if len(found) > 1:
        raise CliError(f"task id prefix {ref!r} is ambiguous: give more characters")
    return found[0] if found else None


def run_logs(c: Client, args: argparse.Namespace) -> None:
    """`service logs SERVICE|TASK`: a service's tasks merged, or one task's (by id)."""
    import urllib.parse

    query = {"tail": args.tail, "follow": int(args.follow), "timestamps": int(args.timestamps)}
    if args.container:
        query["container"] = args.container
    if args.since:
        query["since"] = repr(parse_since(args.since))
    ref, task = args.service, ""
    try:
        c.call("GET", f"/v1/services/{_q(ref)}")
    except CliError:
        owner = _task_owner(c, ref) if len(ref) >= 4 else None
        if owner is None:
            raise
        ref, task = owner
    width = 0
    for rec in c.stream(f"/v1/services/{_q(ref)}/logs?{urllib.parse.urlencode(query)}"):
        if task and rec.get("task") != task:
            continue
        prefix = f"{rec['name']}.{rec['task'][:12]}@{rec['node']}"
        width = max(width, len(prefix))
        sink = sys.stderr if rec.get("stream") == "stderr" else sys.stdout
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
        r = c.call("POST", f"/v1/{kind}s", {"name": args.name, "labels": parse_kv(
            args.label, "--label"), "data": _b64(data)})
        print(r["id"])
    elif sub == "ls":
        output.show(c.call("GET", f"/v1/{kind}s"), args, kind)
    elif sub == "inspect":
        out = [c.call("GET", f"/v1/{kind}s/{_q(n)}") for n in args.names]
        print(json.dumps(out, indent=2))
    elif sub == "rm":
        for n in args.names:
            c.call("DELETE", f"/v1/{kind}s/{_q(n)}")
            print(n)


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
class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, whose width comes from os.get_terminal_size: argparse's own
    imports shutil for it (and with it zlib, bz2, lzma: ~2.5 ms), on every add_argument."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:  # (shutil.get_terminal_size's rules: $COLUMNS, stdout, else 80)
            try:
                width = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                width = 0
            if width <= 0:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    width = 0
            width = (width or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """Errors as one ``Error:`` line. Built with ``build_parser(lazy=True)`` (the CLI's own
    run), a parser only records its ``add_argument`` calls and ``lazy`` functions, and makes
    them when it is used (or its help shown): building ~60 sub-parsers' options for every
    `shoal service ls` would cost more than the request, and the spec-driven flags of
    `service create/update` need the spec (msgspec) that a `service ls` should not import."""

    recording = False  # set while build_parser(lazy=True) runs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lazy: list[Any] = []
        self._recording = False
        helps = kwargs.get("add_help", True)
        kwargs.setdefault("formatter_class", _Formatter)
        if _Parser.recording:  # (-h is recorded too: adding an option makes a formatter)
            kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self._recording = _Parser.recording
        if self._recording and helps:
            self.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                              help="show this help message and exit")

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if not self._recording:
            return super().add_argument(*args, **kwargs)
        self.lazy.append(lambda p: argparse.ArgumentParser.add_argument(p, *args, **kwargs))
        return None

    def _populate(self) -> None:
        self._recording = False
        todo, self.lazy = self.lazy, []
        for add in todo:
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populate()
        return super().format_help()

    def format_usage(self) -> str:
        self._populate()
        return super().format_usage()

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments") and self.prog.endswith(
                "service update"):
            message += (" (after the service name only flags: give a new command with "
                        "--args \"CMD ARGS...\" or after `--` at the end)")
        self.print_usage(sys.stderr)
        self.exit(2, f"Error: {message}\n")


def _lazy(parser: argparse.ArgumentParser, add: Any) -> None:
    """Run ``add(parser)`` when ``parser`` is used (see _Parser)."""
    if isinstance(parser, _Parser) and parser._recording:
        parser.lazy.append(add)
    else:
        add(parser)


class _Version(argparse.Action):
    """``--version`` (the installed distribution's metadata is read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from shoal.node.version import version

        print(f"shoal {version()}")  # (on stdout, as argparse's own version action)
        parser.exit(0)


def _seconds(flag: str) -> Any:
    """An argparse type: a Go duration (``30s``, ``1m30s``, ``500ms``) or seconds → seconds."""
    def parse(text: str) -> float:
        from shoal.cli.specflags import parse_duration

        try:
            return parse_duration(text, flag)
        except CliError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
    parse.__name__ = "duration"
    return parse


def _create_flags(parser: argparse.ArgumentParser) -> None:
    from shoal.cli import specflags

    specflags.add_create_flags(parser)


def _update_flags(parser: argparse.ArgumentParser) -> None:
    from shoal.cli import specflags

    specflags.add_update_flags(parser)


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


def _agent_parser(sub: Any) -> None:
    a = sub.add_parser("agent", help="run the node agent (long-running, as root)")
    a.add_argument("--data-dir", default="/var/lib/shoal")
    a.add_argument("--advertise-addr", required=True, help="this host's IP for other nodes")
    a.add_argument("--listen-addr", default="", help="bind address (default: advertise addr)")
    a.add_argument("--api-port", type=int, default=2377)
    a.add_argument("--raft-port", type=int, default=2378)
    a.add_argument("--gossip-port", type=int, default=7946)
    a.add_argument("--gossip-preset", choices=["lan", "local"], default="lan",
                   help="failure-detection timings (local: test hosts only)")
    a.add_argument("--hostname", default=None, help="node name shown in `node ls`")
    a.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    a.add_argument("--remote-api-port", type=int, default=0, metavar="PORT",
                   help="also serve the CLI's API on TCP PORT over mutual TLS (client "
                   "certificates from `shoal ca issue-client`); default off")
    a.add_argument("--join-wait", type=_seconds("--join-wait"), default=20.0,
                   metavar="DURATION", help="how long `shoal join` waits for this node to "
                   "catch up once admitted (it keeps catching up after; 0-300s, default 20s)")
    a.add_argument("--restart-grace", type=_seconds("--restart-grace"), default=30.0,
                   metavar="DURATION",
                   help="on SIGTERM (upgrade, restart) ask the leader to wait this long for "
                   "the next agent before replacing this node's tasks (0-300, 0 = treat a "
                   "stop like a crash; default 30)")
    a.add_argument("--metrics-addr", default="", metavar="ADDR:PORT",
                   help="also serve GET /metrics (Prometheus) on ADDR:PORT; default: only on "
                   "the unix socket and the remote API")
    a.add_argument("--metrics-mtls", action="store_true",
                   help="require a client certificate (`shoal ca issue-client`) on "
                   "--metrics-addr, as the remote API does")
    a.add_argument("--dashboard-addr", default="", metavar="ADDR:PORT",
                   help="serve the web dashboard on ADDR:PORT on managers (default off; "
                   "keep it on 127.0.0.1 or use --dashboard-tls; users: `shoal user add`)")
    a.add_argument("--dashboard-tls", action="store_true",
                   help="serve the dashboard over TLS with this node's cluster certificate")
    a.add_argument("--events-retained", type=int, default=10_000, metavar="N",
                   help="events a manager keeps for `shoal events --since` (default 10000)")
    a.add_argument("--registry-ca", default="", metavar="FILE",
                   help="PEM CA certificates trusted for registries besides the system's")
    a.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="a registry reached over plain HTTP (repeatable; never by default)")
    _lazy(a, registry_cli.add_agent_flags)  # (imports the runtime: only for `agent`)
    m = a.add_argument_group("MQTT bridge (node availability, cluster state and events)")
    m.add_argument("--mqtt-url", default="", metavar="mqtt[s]://[USER@]HOST[:PORT]",
                   help="publish to this MQTT broker (default: no bridge)")
    m.add_argument("--mqtt-password-file", default="", metavar="FILE",
                   help="file holding USER's password (first line)")
    m.add_argument("--mqtt-ca", default="", metavar="FILE",
                   help="CA certificate(s) that signed the broker's (default: system CAs)")
    m.add_argument("--mqtt-cert", default="", metavar="FILE", help="client certificate")
    m.add_argument("--mqtt-key", default="", metavar="FILE", help="client certificate's key")
    m.add_argument("--mqtt-topic-prefix", default="", metavar="TOPIC",
                   help="topic prefix (default shoal/ + the cluster id's first 12 characters)")
    m.add_argument("--mqtt-keepalive", type=int, default=10, metavar="SECONDS",
                   help="MQTT keepalive; a dead node is announced offline after 1.5x this")
    m.add_argument("--mqtt-command-key-file", default="", metavar="FILE",
                   help="accept scale commands signed (HMAC-SHA256) with this key (managers)")
    # hidden: certificate lifetime (seconds) this node signs as a manager, and the fraction of
    # it after which nodes renew (tests use seconds; the default is 90 days, halfway)
    a.add_argument("--cert-lifetime", type=_seconds("--cert-lifetime"), default=90 * 86400.0,
                   help=argparse.SUPPRESS)
    a.add_argument("--cert-renew-fraction", type=float, default=0.5, help=argparse.SUPPRESS)


def _cluster_parsers(sub: Any) -> None:
    ini = sub.add_parser("init", help="create a cluster; this node becomes its first manager")
    ini.add_argument("--cluster-cidr", default="",
                     help="task address pool, cut into a /24 per node (default 10.99.0.0/16)")
    ini.add_argument("--default-addr-pool", default="", metavar="CIDR",
                     help="pool of user-defined networks' /24 subnets (default 10.96.0.0/15)")
    ini.add_argument("--autolock", action="store_true", help="encrypt the managers' keys at "
                     "rest under an unlock key (printed once; see `shoal unlock`)")
    j = sub.add_parser("join", help="join a cluster")
    j.add_argument("--token", required=True)
    j.add_argument("remote", metavar="MANAGER_ADDR:PORT")
    jt = sub.add_parser("join-token", help="show (or rotate) a join token")
    jt.add_argument("role", choices=["worker", "manager"])
    jt.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    jt.add_argument("--rotate", action="store_true", help="replace the token")
    lv = sub.add_parser("leave", help="leave the cluster")
    lv.add_argument("-f", "--force", action="store_true")
    sub.add_parser("info", help="show this node's agent and cluster status")


def _node_parser(sub: Any) -> None:
    n = sub.add_parser("node", help="manage nodes")
    nsub = n.add_subparsers(dest="node_cmd", required=True, parser_class=_Parser)
    nls = nsub.add_parser("ls", help="list nodes")
    output.add_list_flags(nls, "node")
    nps = nsub.add_parser("ps", help="list the tasks on nodes (default: this node)")
    nps.add_argument("nodes", nargs="*", metavar="NODE")
    output.add_list_flags(nps, "task")
    ni = nsub.add_parser("inspect", help="show node details (JSON)")
    ni.add_argument("nodes", nargs="+")
    ni.add_argument("--format", choices=["json"], default="json")
    nu = nsub.add_parser("update", help="change a node's availability or labels")
    nu.add_argument("node")
    nu.add_argument("--availability", choices=["active", "pause", "drain"])
    nu.add_argument("--label-add", action="append", default=[], metavar="KEY=VALUE")
    nu.add_argument("--label-rm", action="append", default=[], metavar="KEY")
    nu.add_argument("--role", choices=["manager", "worker"],
                    help="promote or demote the node (as `node promote|demote`)")
    for verb, what in (("promote", "make workers managers (Raft voters)"),
                       ("demote", "make managers workers (tasks keep running)")):
        npd = nsub.add_parser(verb, help=what)
        npd.add_argument("nodes", nargs="+")
        npd.add_argument("--format", choices=["table", "json"], default="table")
    nr = nsub.add_parser("rm", help="remove nodes from the cluster")
    nr.add_argument("nodes", nargs="+")
    nr.add_argument("-f", "--force", action="store_true")


def _service_parser(sub: Any) -> None:
    s = sub.add_parser("service", help="manage services")
    ssub = s.add_subparsers(dest="service_cmd", required=True, parser_class=_Parser)
    sc = ssub.add_parser("create", help="create a service (and wait until it runs, unless -d)")
    progress.add_flags(sc)
    _lazy(sc, _create_flags)
    registry_cli.add_service_flags(sc, update=False)
    sls = ssub.add_parser("ls", help="list services")
    output.add_list_flags(sls, "service")
    sps = ssub.add_parser("ps", help="list the tasks of services")
    sps.add_argument("services", nargs="+", metavar="SERVICE")
    output.add_list_flags(sps, "task")
    si = ssub.add_parser("inspect", help="show service details (JSON)")
    si.add_argument("services", nargs="+")
    si.add_argument("--format", choices=["json"], default="json")
    ss = ssub.add_parser("scale", help="set replica counts: NAME=N ...")
    ss.add_argument("pairs", nargs="+", metavar="SERVICE=REPLICAS")
    progress.add_flags(ss)
    su = ssub.add_parser("update", help="change a service; only a change of the task "
                         "template replaces tasks (a rolling update)")
    su.add_argument("service")
    progress.add_flags(su)
    _lazy(su, _update_flags)
    registry_cli.add_service_flags(su, update=True)
    slg = ssub.add_parser("logs", help="output of a service's tasks, merged across nodes (or "
                          "of one task, by its id)")
    slg.add_argument("service", metavar="SERVICE|TASK")
    slg.add_argument("--since", default="", metavar="TIME",
                     help="only lines after TIME: Unix seconds, 2006-01-02T15:04:05Z, or a "
                     "duration before now (10m, 1h30m)")
    slg.add_argument("-f", "--follow", action="store_true", help="keep streaming")
    slg.add_argument("-n", "--tail", default="all", help="lines per task (default all)")
    slg.add_argument("-t", "--timestamps", action="store_true")
    slg.add_argument("--container", default="", metavar="NAME",
                     help="a pod's container (task.sidecars/init_containers); default: main")
    srb = ssub.add_parser("rollback", help="go back to the previous spec")
    srb.add_argument("service")
    progress.add_flags(srb)
    srm = ssub.add_parser("rm", help="remove services")
    srm.add_argument("services", nargs="+")


def _events_parser(sub: Any) -> None:
    ev = sub.add_parser("events", help="stream the cluster's events (like `docker events`)")
    ev.add_argument("--since", default="", metavar="T|CURSOR",
                    help="start after an event's cursor (INDEX-SEQ) or at a time (Unix "
                    "seconds, ISO 8601, or a duration before now such as 10m); default: "
                    "only new events")
    ev.add_argument("--until", default="", metavar="T|CURSOR",
                    help="stop after this cursor or time; default: keep streaming")
    ev.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="type=service|task|node|secret|config, service=NAME, node=NAME, "
                    "event=ACTION (repeatable; one key's values are alternatives)")
    ev.add_argument("--format", default="", metavar="json|TEMPLATE",
                    help="json: one JSON object per line; or a template such as "
                    "'{{.Type}} {{.Action}} {{.Name}}' or '{{json .}}'")


def _gossip_parser(sub: Any) -> None:
    g = sub.add_parser("gossip", help="gossip membership: key rotation")
    gsub = g.add_subparsers(dest="gossip_cmd", required=True, parser_class=_Parser)
    grk = gsub.add_parser("rotate-key", help="roll a new gossip key through the cluster "
                          "without downtime (install, use, retire the old one)")
    grk.add_argument("--format", choices=["table", "json"], default="table")


def _ca_parser(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the cluster CA: info and client certificates")
    casub = ca.add_subparsers(dest="ca_cmd", required=True, parser_class=_Parser)
    casub.add_parser("info", help="CA digest, client names, this node's certificate (JSON)")
    ci = casub.add_parser("issue-client", help="a client certificate for the remote API")
    ci.add_argument("name")
    ci.add_argument("--out", required=True, metavar="DIR",
                    help="write DIR/cert.pem, DIR/key.pem (0600), DIR/ca.pem")
    ci.add_argument("--days", type=float, default=0, help="lifetime (default: the cluster's)")
    ci.add_argument("--user", default="", help="issue it for this user (`shoal user add`): "
                    "it acts with that user's role (default: an admin's certificate)")
    cr = casub.add_parser("revoke-client", help="revoke a client certificate")
    cr.add_argument("name")
    keys.add_ca_parser(casub)


def _secret_parsers(sub: Any) -> None:
    for kind, what in (("secret", "secrets (sealed in the cluster state, files in "
                                  "/run/secrets of tasks)"),
                       ("config", "configs (files in /run/configs of tasks)")):
        k = sub.add_parser(kind, help=f"manage {what}")
        ksub = k.add_subparsers(dest=f"{kind}_cmd", required=True, parser_class=_Parser)
        kc = ksub.add_parser("create", help=f"create a {kind} from a file (- = stdin)")
        kc.add_argument("name")
        kc.add_argument("file", metavar="FILE|-")
        kc.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
        kl = ksub.add_parser("ls", help=f"list {kind}s")
        output.add_list_flags(kl, kind)
        ki = ksub.add_parser("inspect", help=f"show {kind} details (JSON)" +
                             (" without its value" if kind == "secret" else ""))
        ki.add_argument("names", nargs="+")
        ki.add_argument("--format", choices=["json"], default="json")
        kr = ksub.add_parser("rm", help=f"remove {kind}s (not while a service uses them)")
        kr.add_argument("names", nargs="+")


def _image_parser(sub: Any) -> None:
    im = sub.add_parser("image", help="manage this node's images")
    isub = im.add_subparsers(dest="image_cmd", required=True, parser_class=_Parser)
    il = isub.add_parser("load", help="load a docker-save or OCI image-layout tarball")
    il.add_argument("file")
    ii = isub.add_parser("import", help="import a rootfs directory or tarball as NAME[:TAG]")
    ii.add_argument("ref", metavar="NAME[:TAG]")
    ii.add_argument("file")
    ils = isub.add_parser("ls", help="list this node's images")
    output.add_list_flags(ils, "image")
    irm = isub.add_parser("rm", help="remove images from this node")
    irm.add_argument("refs", nargs="+")
    registry_cli.add_image_pull(isub)
    registry_cli.add_image_prune(isub)
    build_cli.add_parser(isub)


# The top-level commands, in `shoal --help`'s order: (names, what adds their parsers under
# the top-level sub-parsers). build_parser(only=NAME) builds only NAME's entry: main() passes
# the group argv names, so `shoal service ls` never builds (nor imports) the others.
_GROUPS: list[tuple[tuple[str, ...], Callable[[Any], None]]] = [
    (("agent",), _agent_parser),
    (("init", "join", "join-token", "leave", "info"), _cluster_parsers),
    (("node",), _node_parser),
    (("service",), _service_parser),
    (("events",), _events_parser),
    (("gossip",), _gossip_parser),
    (("ca",), _ca_parser),
    (("secret", "config"), _secret_parsers),
    (("image",), _image_parser),
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


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(lazy=True, only=command_group(words))
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
