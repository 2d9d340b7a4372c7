"""`service create` and `service update` flags, made from the spec's declarations.

Owns: turning each declared field of ``shoal.raft.spec.ServiceSpec`` (its ``flag``, ``cli``
kind, ``item`` parser, help, unit) into argparse options — ``--X`` on create; on update the
same ``--X`` for single values and ``--X-add``/``--X-rm`` for lists and maps — and the flag
values back into a nested spec dict (the text parsers of the values: shoal.cli.flagvalues).
Adding a spec field with a ``flag``
adds its CLI flags; nothing here names a field. Must not touch: the API client, output.

Errors: ``CliError`` (shoal.cli.errors) naming the flag, for a value the CLI can judge;
the API judges the rest and names the field (``service_error`` maps it back to the flag).
"""

from __future__ import annotations

import argparse
import copy
import re
import secrets
from typing import Any

from shoal.cli.errors import CliError
from shoal.cli.flagvalues import (
    CARRIES,
    ITEMS,
    REMOVES,
    REPLACES,
    as_list,
    get_path,
    parse_cap,
    parse_kv,
    parse_security_opts,
    parsed_items,
    read_env_files,
    scalar,
    set_path,
)
from shoal.raft.spec import FieldDecl, fields, flag_for

# ----------------------------------------------------------------------------- argparse

def _dest(d: FieldDecl, suffix: str = "") -> str:
    return "spec_" + d.path.replace(".", "__") + suffix


def _help(d: FieldDecl) -> str:
    unit = f" ({d.unit})" if d.unit and d.cli != "duration" else ""
    extra = " (e.g. 10s, 1m30s)" if d.cli == "duration" else ""
    default = f" [default {d.default}]" if d.default not in (None, "", (), {}, 0, 0.0) \
        and d.cli != "struct" else ""
    return f"{d.help}{unit}{extra}{default}".replace("%", "%%")


def _metavar(d: FieldDecl) -> str | None:
    return d.metavar or {"duration": "DURATION", "int": "N", "float": "NUMBER"}.get(d.cli)


def _flag_decls() -> list[FieldDecl]:
    return [d for d in fields() if d.flag]


# lists whose update flag is the create flag itself, as docker's `service update --cap-add X`:
# X is added to this list and taken out of the paired one (no --cap-add-add/--cap-add-rm)
PAIRED: dict[str, str] = {"task.container.cap_add": "task.container.cap_drop",
                          "task.container.cap_drop": "task.container.cap_add"}

CAP_ADD, CAP_DROP = "task.container.cap_add", "task.container.cap_drop"

# maps whose create flag, given on update, replaces the whole map, as docker's `service update
# --log-driver D --log-opt K=V` (docker's updateLogDriver): the options belong to the driver,
# so the driver's flag alone clears them too; --X-add/--X-rm then apply as to any map
REPLACED: dict[str, str] = {"task.container.log_options": "task.container.log_driver"}


def _update_caps(spec: dict[str, Any], args: argparse.Namespace) -> None:
    """docker's updateCapabilities: ``--cap-add X`` adds X and takes it out of the dropped
    ones, ``--cap-drop X`` the reverse; a capability in both flags is added (adding wins);
    ``RESET`` empties that list first."""
    decls = {d.path: d for d in _flag_decls() if d.path in PAIRED}
    given: dict[str, set[str]] = {}
    for path in (CAP_ADD, CAP_DROP):
        d = decls[path]
        words = getattr(args, _dest(d, "_add"))
        given[path] = {parse_cap(t, d.flag) for t in words if t.strip().upper() != "RESET"}
        if any(t.strip().upper() == "RESET" for t in words):
            set_path(spec, path, [])
    to_add, to_drop = given[CAP_ADD], given[CAP_DROP] - given[CAP_ADD]
    for path, mine, theirs in ((CAP_ADD, to_add, to_drop), (CAP_DROP, to_drop, to_add)):
        kept = [c for c in get_path(spec, path, []) or [] if c not in theirs and c not in mine]
        set_path(spec, path, kept + sorted(mine))


# docker's other spelling of a flag (scripts written for `docker service create` work as is)
ALIASES: dict[str, tuple[str, ...]] = {"--max-replicas-per-node": ("--replicas-max-per-node",),
                                       "--group": ("--group-add",)}


def add_create_flags(parser: argparse.ArgumentParser) -> None:
    """One option per declared flag, then Docker's ``IMAGE [COMMAND [ARG...]]`` or shoal's
    ``-- CMD [ARGS...]`` (a command on the host's filesystem, or for ``--image``)."""
    for d in _flag_decls():
        names = [d.flag, *ALIASES.get(d.flag, ())] + ([d.short] if d.short else [])
        kw: dict[str, Any] = {"dest": _dest(d), "help": _help(d)}
        if _metavar(d) and d.cli != "choice":
            kw["metavar"] = _metavar(d)
        if d.cli in ("map", "list", "seccomp"):  # (--security-opt: as often as docker run's)
            parser.add_argument(*names, action="append", default=[], **kw)
        elif d.cli == "choice":
            parser.add_argument(*names, choices=d.choices, **kw)
        elif d.cli == "flag":
            kw.pop("metavar", None)
            parser.add_argument(*names, action="store_true", default=None, **kw)
            _add_bool_values(parser, d)
        else:
            parser.add_argument(*names, **kw)
    parser.add_argument("--init", action="store_true", help="accepted as docker's: shoal "
                        "always runs an init (tini) as each task's PID 1, forwarding signals "
                        "and reaping processes")
    parser.add_argument("--spec", default="", metavar="FILE",
                        help="the service spec from a YAML/JSON file (- = stdin; docs/api.md's "
                        "spec reference, e.g. a pod's task.sidecars); flags given override it")
    parser.add_argument("--env-file", action="append", default=[], dest="env_file",
                        metavar="FILE", help="environment variables from FILE: KEY=VALUE lines "
                        "as docker's (no quote removal; a bare KEY takes this shell's value; "
                        "# comments); later files, then -e, win")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        metavar="IMAGE [COMMAND [ARG...]] | -- CMD [ARGS...]")


def _add_bool_values(parser: argparse.ArgumentParser, d: FieldDecl) -> None:
    """A switch's docker (pflag) spellings ``--read-only=false`` and ``=true`` (``=0``,
    ``=1``, ``=F``, ``=True``…): argparse matches an option string with '=' whole before
    splitting it."""
    for word, value in [(w, True) for w in ("1", "t", "T", "TRUE", "true", "True")] + \
            [(w, False) for w in ("0", "f", "F", "FALSE", "false", "False")]:  # (pflag's)
        parser.add_argument(f"{d.flag}={word}", action="store_const", const=value,
                            dest=_dest(d), help=argparse.SUPPRESS)


NO_HEALTHCHECK = "task.container.healthcheck.disable"


def add_update_flags(parser: argparse.ArgumentParser) -> None:
    """Single values: ``--X``; lists and maps: ``--X-add`` and ``--X-rm`` (a ``REPLACED``
    map: ``--X`` too). The name, which cannot change, has no flag."""
    for d in _flag_decls():
        if d.path == "name":
            continue
        kw: dict[str, Any] = {"help": _help(d)}
        if d.path in PAIRED:
            parser.add_argument(d.flag, action="append", default=[], dest=_dest(d, "_add"),
                                metavar=d.metavar, help=f"{kw['help']} (taken out of "
                                f"{flag_for(PAIRED[d.path])})")
        elif d.cli in ("map", "list"):
            if d.path in REPLACED:
                parser.add_argument(d.flag, action="append", default=None, dest=_dest(d),
                                    metavar=d.metavar, help=f"replace them all "
                                    f"({flag_for(REPLACED[d.path])} alone clears them, as "
                                    f"docker's): {kw['help']}")
            parser.add_argument(d.flag + "-add", action="append", default=[],
                                dest=_dest(d, "_add"), metavar=d.metavar or "VALUE",
                                help=f"add to: {kw['help']}")
            key = "KEY" if d.cli == "map" else "ITEM"
            parser.add_argument(d.flag + "-rm", action="append", default=[],
                                dest=_dest(d, "_rm"), metavar=key,
                                help=f"remove from: {d.help}".replace("%", "%%"))
        elif d.cli == "choice":
            parser.add_argument(d.flag, choices=d.choices, dest=_dest(d), **kw)
        elif d.cli == "flag":  # (docker's update takes -t too)
            parser.add_argument(d.flag, *([d.short] if d.short else []), action="store_true",
                                default=None, dest=_dest(d), **kw)
            _add_bool_values(parser, d)
        elif d.cli == "struct":  # --X KEY=V,... (the keys given replace theirs), --X-rm: off
            parser.add_argument(d.flag, dest=_dest(d), metavar=_metavar(d), **kw)
            parser.add_argument(d.flag + "-rm", action="store_true", dest=_dest(d, "_rm"),
                                help=f"turn {d.flag} off")
        elif d.cli == "seccomp":  # (as often as docker run's --security-opt)
            parser.add_argument(d.flag, action="append", default=[], dest=_dest(d),
                                metavar=_metavar(d), **kw)
        else:  # (docker's update takes -u and -w too)
            parser.add_argument(d.flag, *([d.short] if d.short else []),
                                *ALIASES.get(d.flag, ()), dest=_dest(d), metavar=_metavar(d),
                                **kw)
    parser.add_argument("--init", action="store_true", help="accepted as docker's: every task "
                        "has an init (tini) as its PID 1")
    parser.add_argument("--force", action="store_true", help="redeploy even if nothing changed")
    parser.add_argument("--args", default=None, metavar='"CMD ARGS..."',
                        help="replace the command (split as a shell would); or give it after "
                        "`--` at the end")
    parser.add_argument("--rollback", action="store_true",
                        help="go back to the previous spec (as `service rollback`)")
    # after NAME only flags: a stray word is an error (not silently the new command); the
    # command after `--` is split off before parsing (shoal.cli.main.split_update_command)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    parser.set_defaults(command=[])


def _command(args: argparse.Namespace) -> list[str]:
    """`service update`'s new command: ``--args "CMD ARGS"`` or the words after ``--``."""
    if getattr(args, "extra", None):
        raise CliError(f"service update takes flags after the service name, got "
                       f"{args.extra[0]!r}: give a new command with --args \"CMD ARGS...\" "
                       "or after `--` at the end")
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if getattr(args, "args", None) is not None:
        if command:
            raise CliError("--args and a command after `--` cannot both be given")
        import shlex

        try:
            command = shlex.split(args.args)
        except ValueError as exc:
            raise CliError(f"--args: {exc} in {args.args!r}") from None
        if not command:
            raise CliError("--args: the command cannot be empty")
    return command


def _map(d: FieldDecl, items: list[str], flag: str) -> dict[str, Any]:
    """A map flag's ``KEY=VALUE`` items; a map of counts (``item="count"``: generic
    resources, ``gpu=1``) with whole numbers >= 1 as values."""
    out: dict[str, Any] = parse_kv(items, flag)
    if d.item == "count":
        for key, value in out.items():
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise CliError(f"{flag} {key}={value}: expected KIND=N, N a whole number >= 1")
            out[key] = int(value)
    return out


def spec_from_create_args(args: argparse.Namespace) -> dict[str, Any]:
    """The nested spec dict a `service create` asks for (only what was given; the agent fills
    in the declared defaults)."""
    spec: dict[str, Any] = {}
    for d in _flag_decls():
        value = getattr(args, _dest(d))
        if d.cli == "map":
            if value:
                set_path(spec, d.path, _map(d, value, d.flag))
        elif d.cli == "list":
            if value:
                parse = ITEMS[d.item][0]
                set_path(spec, d.path, parsed_items(parse, value, d.flag))
                if d.item in CARRIES:
                    CARRIES[d.item](spec, d.path, value, d.flag, ())
        elif d.cli == "struct":
            if value is not None:
                parsed = ITEMS[d.item][0](value, d.flag)
                if parsed and "max" not in parsed:
                    raise CliError(f"{d.flag} {value!r}: max=N is required")
                set_path(spec, d.path, parsed)
        elif d.cli == "seccomp":
            if (setting := parse_security_opts(value, d.flag)) is not None:
                set_path(spec, d.path, setting)
        elif value is not None:
            set_path(spec, d.path, scalar(d, value, d.flag))
    if getattr(args, "env_file", None):  # --env-file: under the -e values
        set_path(spec, "task.container.env", {**read_env_files(args.env_file),
                                          **get_path(spec, "task.container.env", {})})
    raw = list(args.command)
    if raw and raw[0] == "--":  # shoal's form: a command (host filesystem, or --image's)
        command = raw[1:]
    elif raw and not get_path(spec, "task.container.image", ""):  # Docker's IMAGE [COMMAND...]
        set_path(spec, "task.container.image", raw[0])
        command = raw[1:]
    else:  # --image given: what follows is its command
        command = raw
    path = getattr(args, "spec", "")
    if command:
        set_path(spec, "task.container.command", command)
    if path:  # --spec FILE: the file, with the flags given laid over it
        from shoal.cli import specfile

        spec = specfile.overlay(specfile.load(path), spec)
        specfile.check(spec, path)
        return spec
    if not command and not get_path(spec, "task.container.image", ""):
        raise CliError("service create needs a command or an image: shoal service create "
                       "[--name NAME] IMAGE [COMMAND...], or ... -- CMD [ARGS...] to run a "
                       "command of the host's filesystem")
    if not spec.get("name"):
        spec["name"] = generated_name(get_path(spec, "task.container.image", "") or command[0])
    return spec


def generated_name(what: str) -> str:
    """A service name for a create without ``--name`` (Docker picks a random one): the
    image's (or command's) base name and 5 random hex digits, e.g. ``nginx-3fa9c``."""
    base = what.rsplit("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    base = re.sub(r"[^A-Za-z0-9-]+", "-", base).strip("-")[:40] or "service"
    return f"{base}-{secrets.token_hex(3)[:5]}"


def apply_update_args(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``current`` (the service's spec as `service inspect` shows it) with the update flags
    applied: single values replaced; on lists and maps ``--X-add`` (an item with the same key
    is replaced), then ``--X-rm`` (a removal wins, as in Docker)."""
    spec = copy.deepcopy(current)
    given: set[str] = set()  # the Structs (parent paths) a flag of this update sets
    for d in _flag_decls():
        if d.path == "name":
            continue
        if d.cli == "map":
            value = dict(get_path(spec, d.path, {}) or {})
            if d.path in REPLACED and (getattr(args, _dest(d)) is not None or getattr(
                    args, "spec_" + REPLACED[d.path].replace(".", "__")) is not None):  # (_dest)
                value = parse_kv(getattr(args, _dest(d)) or [], d.flag)
            put = _map(d, getattr(args, _dest(d, "_add")), d.flag + "-add")
            taken_out = list(getattr(args, _dest(d, "_rm")))
            if d.item == "count":  # (generic resources: kinds ignore case; docker's order)
                drop = {k.lower() for k in [*taken_out, *put]}
                value = {k: v for k, v in value.items() if k.lower() not in drop}
                taken_out = []
            value.update(put)
            for key in taken_out:
                value.pop(key, None)
            set_path(spec, d.path, value)
        elif d.path in PAIRED:  # (docker's --cap-add/--cap-drop on update: both at once)
            if d.path == CAP_ADD:
                _update_caps(spec, args)
        elif d.cli == "list":
            parse, key_of, parse_rm = ITEMS[d.item]
            same = REPLACES.get(d.item, key_of)
            items = list(get_path(spec, d.path, []) or [])
            gone = {k for t in getattr(args, _dest(d, "_rm"))
                    for k in as_list(parse_rm(t, d.flag + "-rm"))}
            removes = REMOVES.get(d.item)

            def kept(values: list[Any]) -> list[Any]:
                return [i for i in values if not any(
                    removes(i, g) if removes else key_of(i) == g for g in gone)]  # noqa: B023
            added = parsed_items(parse, getattr(args, _dest(d, "_add")), d.flag + "-add")
            if d.item == "network":
                # docker's order for networks: --network-rm, then --network-add, which may
                # not name one the service is still attached to (`--network-rm back
                # --network-add name=back,alias=db` is how docker changes its aliases)
                items = kept(items)
                for new in added:
                    if any(key_of(i) == key_of(new) for i in items):
                        raise CliError(f"{d.flag}-add: the service is already attached to "
                                       f"network {key_of(new)}")
                    items.append(new)
                set_path(spec, d.path, items)
                gone -= {key_of(n) for n in added}
            else:
                for new in added:
                    if d.item == "host" and new in items:
                        continue  # (docker's updateHosts: an /etc/hosts line keeps its place)
                    had = next((i for i in items if (i.get("target"), i.get("protocol", "tcp"))
                                == (new["target"], new.get("protocol", "tcp"))), None) \
                        if d.item == "port" and not new.get("published") else None
                    if had is not None:  # (-p 81 again: the port the managers gave it stays,
                        # once; -p 127.0.0.1::81 moves it to that address)
                        if had.get("host_ip", "") != new.get("host_ip", ""):
                            items = [{**i, "host_ip": new.get("host_ip", "")} if i is had
                                     else i for i in items]
                        continue
                    items = [i for i in items if same(i) != same(new)] + [new]
                set_path(spec, d.path, kept(items))  # (a removal wins, as in Docker)
            if d.item in CARRIES:
                CARRIES[d.item](spec, d.path, getattr(args, _dest(d, "_add")),
                                d.flag + "-add", sorted(gone))
        elif d.cli == "struct":
            value = getattr(args, _dest(d))
            if getattr(args, _dest(d, "_rm")):
                set_path(spec, d.path, {})
            elif value is not None:
                parsed = ITEMS[d.item][0](value, d.flag)
                set_path(spec, d.path, {**(get_path(spec, d.path, {}) or {}), **parsed}
                     if parsed else {})
        elif d.cli == "seccomp":
            if (setting := parse_security_opts(getattr(args, _dest(d)), d.flag)) is not None:
                set_path(spec, d.path, setting)
                given.add(d.path.rpartition(".")[0])
        else:
            value = getattr(args, _dest(d))
            if value is not None:
                set_path(spec, d.path, scalar(d, value, d.flag))
                if d.cli != "flag":
                    given.add(d.path.rpartition(".")[0])
    # ``--no-healthcheck`` is turned off by any other flag of the health check (``--health-cmd``
    # on update re-enables the check, as in Docker); other switches (--read-only, --tty…)
    # keep their value unless given, as docker's updateBool
    for d in _flag_decls():
        if d.path == NO_HEALTHCHECK and getattr(args, _dest(d)) is None and \
                d.path.rpartition(".")[0] in given:
            set_path(spec, d.path, False)
    # the check kinds are alternatives: the one given replaces the others (as docker's
    # --health-cmd replaces the test, whatever its form)
    check = "task.container.healthcheck."
    chosen = [d.path for d in _flag_decls() if d.path in (
        check + "command", check + "http", check + "tcp") and getattr(args, _dest(d)) is not None]
    if chosen:
        for kind, empty in (("command", ""), ("exec", []), ("http", ""), ("tcp", 0)):
            if check + kind not in chosen and get_path(spec, check + kind, empty):
                set_path(spec, check + kind, empty)
    command = _command(args)
    if command:
        set_path(spec, "task.container.command", command)
    if args.force:
        set_path(spec, "task.force_update", int(get_path(spec, "task.force_update", 0)) + 1)
    return spec


def flag_of_field(field: str) -> str:
    """The flag to name in an error about spec field ``field`` ("" if none)."""
    if field.startswith("task.container.command"):
        return "-- CMD"
    if field.startswith("task.network_aliases"):  # (given as --network name=N,alias=A)
        return "--network"
    if field.startswith("endpoint.host_ports"):  # (given as --publish mode=host,...)
        return "--publish"
    return flag_for(field)
