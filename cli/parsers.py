"""The `shoal` command's argparse parsers: one builder per command group, and the lazy parser.

Owns: the builders that add one command group's sub-parsers (``_agent_parser``,
``_cluster_parsers``, ``_node_parser``, ``_service_parser``, ``_events_parser``,
``_gossip_parser``, ``_ca_parser``, ``_secret_parsers``, ``_image_parser``), the help text of
those commands, and the argparse machinery every parser of the CLI uses: ``_Parser`` (records
its options and makes them when used; errors as one ``Error:`` line), ``_Formatter``,
``_lazy``, ``_Version``, ``_seconds``. Must not touch: running commands or the agent's API
(shoal.cli.main: ``run``, ``main``, ``build_parser`` and the ``_GROUPS`` table that lists
these builders), anything but argparse at import time: `shoal service ls` imports this module
(tests/test_cli_shape.py checks the import set, bench/cli_latency.py its time), so the
command groups' own modules (progress, registry, build, keys, specflags) are imported inside
the builder that needs them, when it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from shoal.cli import output
from shoal.cli.errors import CliError

# typing.TYPE_CHECKING without importing typing (see shoal.cli.main)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


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
        # a value such as -5M or -5s is a (bad) value, refused naming its flag, not a
        # missing one (argparse takes only -5 and -.5 for numbers)
        self._negative_number_matcher = re.compile(r"^-\.?[0-9]")
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
        # one line, as docker's (the usage of `service create` alone is ~50 lines); a
        # missing sub-command is named as the user types it, not by its internal dest
        message = re.sub(r"required: (?:\w+_)?cmd\b", "required: a command (see --help)",
                         message)
        self.exit(2, f"Error: {message}\nSee '{self.prog} --help'.\n")


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
        from shoal.cli.flagvalues import parse_duration

        try:
            return parse_duration(text, flag)
        except CliError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
    parse.__name__ = "duration"
    return parse


def _raft_multiplier(text: str) -> float:
    """An argparse type: --raft-multiplier, a number from 1 to 10."""
    from shoal.raft.store import MAX_MULTIPLIER, MIN_MULTIPLIER

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not MIN_MULTIPLIER <= value <= MAX_MULTIPLIER:
        raise argparse.ArgumentTypeError(
            f"a number from {MIN_MULTIPLIER:g} to {MAX_MULTIPLIER:g}, got {text!r}")
    return value


_raft_multiplier.__name__ = "raft multiplier"


def _create_flags(parser: argparse.ArgumentParser) -> None:
    from shoal.cli import specflags

    specflags.add_create_flags(parser)


def _update_flags(parser: argparse.ArgumentParser) -> None:
    from shoal.cli import specflags

    specflags.add_update_flags(parser)


def _agent_parser(sub: Any) -> None:
    from shoal.cli import registry as registry_cli

    a = sub.add_parser("agent", help="run the node agent (long-running, as root)")
    a.add_argument("--data-dir", default="/var/lib/shoal")
    a.add_argument("--advertise-addr", required=True, help="this host's IP for other nodes")
    a.add_argument("--listen-addr", default="", help="bind address (default: advertise addr)")
    a.add_argument("--api-port", type=int, default=2377)
    a.add_argument("--raft-port", type=int, default=2378)
    a.add_argument("--gossip-port", type=int, default=7946)
    a.add_argument("--gossip-preset", choices=["lan", "local"], default="lan",
                   help="failure-detection timings (local: test hosts only)")
    a.add_argument("--cgroup-parent", default="shoal", metavar="NAME",
                   help="parent cgroup of this node's task groups, under each cgroup "
                   "hierarchy (default shoal), as dockerd's --cgroup-parent")
    a.add_argument("--raft-multiplier", type=_raft_multiplier, default=1.0, metavar="N",
                   help="stretch the managers' Raft timing by N (1-10, default 1), as Nomad's "
                   "raft_multiplier: 1 fails over in ~0.6 s; 2 halves idle Raft traffic and "
                   "CPU and takes ~1 s; give every manager the same N")
    a.add_argument("--hostname", default=None, help="node name shown in `node ls`")
    a.add_argument("--generic-resource", action="append", default=[], metavar="KIND=VALUE",
                   help="a generic resource this node advertises when it joins (Swarm's "
                   "node-generic-resources): VALUE all digits = the kind's count (SSD=3), "
                   "else one named ID (GPU=UUID1; repeat for more); later changes: "
                   "`node update --generic-resource-add/-rm`")
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
    inf = sub.add_parser("info", help="show this node's agent and cluster status")
    inf.add_argument("--format", default=None, metavar="text|json|TEMPLATE",
                     help="text (the default on a terminal), json (the default otherwise: "
                     "scripts, the Ansible role) or a template, e.g. '{{.NodeID}}'")
    ver = sub.add_parser("version", help="the CLI's version and the agent's (docker "
                         "version)")
    ver.add_argument("--format", default="text", metavar="text|json|TEMPLATE",
                     help="text (default), json or a template, e.g. '{{.Server.Version}}'")


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
    ni.add_argument("--format", default="json", metavar="json|TEMPLATE",
                    help="json (default) or a template, e.g. '{{.Hostname}}'")
    ni.add_argument("--pretty", action="store_true", help="as text for a person (docker's)")
    nu = nsub.add_parser("update", help="change a node's availability or labels")
    nu.add_argument("node")
    nu.add_argument("--availability", choices=["active", "pause", "drain"])
    nu.add_argument("--label-add", action="append", default=[], metavar="KEY=VALUE")
    nu.add_argument("--label-rm", action="append", default=[], metavar="KEY")
    nu.add_argument("--generic-resource-add", action="append", default=[],
                    metavar="KIND=VALUE", help="advertise a generic resource (Swarm's): "
                    "VALUE all digits = the kind's count (SSD=3), else one named ID of the "
                    "kind (GPU=UUID1; repeat for more)")
    nu.add_argument("--generic-resource-rm", action="append", default=[],
                    metavar="KIND|KIND=ID", help="stop advertising a kind, or one named ID "
                    "of it (running tasks keep theirs)")
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
    from shoal.cli import progress
    from shoal.cli import registry as registry_cli

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
    si.add_argument("--format", default="json", metavar="json|TEMPLATE",
                    help="json (default) or a template, e.g. '{{.Spec.Name}}'")
    si.add_argument("--pretty", action="store_true", help="as text for a person (docker's)")
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
    slg.add_argument("--raw", action="store_true", help="the lines alone, no task prefix")
    slg.add_argument("--no-task-ids", action="store_true",
                     help="the prefix without task ids (NAME.SLOT@NODE)")
    slg.add_argument("--no-trunc", action="store_true", help="whole task ids in the prefix")
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
    from shoal.cli import keys

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
    for kind, what in (("secret", "secrets (sealed in the cluster state; files in tasks, "
                                  "/run/secrets/NAME or any path: --secret source=NAME,"
                                  "target=PATH)"),
                       ("config", "configs (files in tasks, /NAME or any path: --config "
                                  "source=NAME,target=/etc/app.conf,uid=101,mode=0440)")):
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
        ki.add_argument("--format", default="json", metavar="json|TEMPLATE",
                        help="json (default) or a template, e.g. '{{.Name}}'")
        kr = ksub.add_parser("rm", help=f"remove {kind}s (not while a service uses them)")
        kr.add_argument("names", nargs="+")


def _image_parser(sub: Any) -> None:
    from shoal.cli import build as build_cli
    from shoal.cli import registry as registry_cli

    im = sub.add_parser("image", help="manage this node's images")
    isub = im.add_subparsers(dest="image_cmd", required=True, parser_class=_Parser)
    il = isub.add_parser("load", help="load a docker-save or OCI image-layout tarball")
    il.add_argument("file")
    ii = isub.add_parser("import", help="import a rootfs directory or tarball as NAME[:TAG]")
    ii.add_argument("ref", metavar="NAME[:TAG]")
    ii.add_argument("file")
    ils = isub.add_parser("ls", help="list this node's images")
    output.add_list_flags(ils, "image")
    iin = isub.add_parser("inspect", help="show an image of this node (JSON): its tags, "
                          "layers and config")
    iin.add_argument("refs", nargs="+", metavar="IMAGE")
    iin.add_argument("--format", default="json", metavar="json|TEMPLATE",
                     help="json (default) or a template, e.g. '{{.Config.Entrypoint}}'")
    irm = isub.add_parser("rm", help="remove images from this node")
    irm.add_argument("refs", nargs="+")
    registry_cli.add_image_pull(isub)
    registry_cli.add_image_tag_push(isub)
    registry_cli.add_image_save(isub)
    registry_cli.add_image_prune(isub)
    build_cli.add_parser(isub)
