"""The text of `service create`/`update` flag values, parsed: sizes, Go durations, `--mount`,
`--publish` (ranges, host mode), `--secret`, `--ulimit`, `--network name=N,alias=A`…, and the
table of list items (``ITEMS``: how each kind of list item is parsed, keyed and removed).

Owns: one value's text → the spec's plain value, and the small helpers that set a dotted
path in a spec dict. shoal.cli.specflags makes the argparse options from the spec's
declarations and uses these for their values. Must not touch: argparse, the API client.

Errors: ``CliError`` (shoal.cli.errors) naming the flag.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.errors import CliError

if TYPE_CHECKING:
    from shoal.raft.spec import FieldDecl

# ----------------------------------------------------------------------------- value parsers

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?) ?([kmgtp])?i?b?$", re.IGNORECASE | re.ASCII)
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


def parse_kv(items: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and key and flag in ("--env", "--env-add"):
            # docker's `-e VAR`: the value of VAR in this shell's environment (left out
            # when it has none)
            if key in os.environ:
                out[key] = os.environ[key]
            continue
        if not sep and key and "label" in flag:  # docker's `--label-add ssd`: an empty value
            out[key] = ""
            continue
        if not sep or not key:
            raise CliError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def read_env_files(paths: Sequence[str], flag: str = "--env-file") -> dict[str, str]:
    """Docker's ``--env-file`` files (docker/cli pkg/kvfile), the later winning: ``KEY=VALUE``
    lines taken as they are (no quote removal, no ``${}``, leading blanks dropped, trailing
    ones kept in the value), ``#`` comment lines and blank lines skipped, a bare ``KEY``
    taken from this shell's environment (left out when unset). Not Compose's ``env_file``
    rules (shoal.cli.compose_env): a Compose file and a docker command each read theirs."""
    out: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as exc:
            raise CliError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            at = exc.object[:exc.start].count(b"\n") + 1
            raise CliError(f"{flag} {path}:{at}: not UTF-8 text") from None
        for n, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
            line = raw.removesuffix("\r").lstrip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not key or any(c in key for c in " \t"):  # (the value is not shown: a secret?)
                raise CliError(f"{flag} {path}:{n}: {key!r} is not a variable name (expected "
                               "KEY=VALUE or KEY, a name without blanks)")
            if sep:
                out[key] = value
            elif key in os.environ:
                out[key] = os.environ[key]
    return out


def parse_size(text: str | None, flag: str) -> int:
    """'64M' → 67108864: Docker's sizes (go-units' RAMInBytes: binary units, ``512MiB``,
    ``512Mi``, ``1.5G``, ``512 m`` too)."""
    if not text:
        return 0
    m = _SIZE_RE.match(text.strip())
    if m is None:
        raise CliError(f"{flag}: invalid size {text!r} (use e.g. 512K, 64M, 1G)")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").lower()])


def parse_duration(text: str, flag: str) -> float:
    """Go's duration syntax (``10s``, ``1m30s``, ``500ms``, ``1h``) or plain seconds → seconds."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION_RE.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise CliError(f"{flag}: invalid duration {text!r} (use e.g. 10s, 1m30s, 500ms, "
                           "or a number of seconds)") from None
    if value < 0:
        raise CliError(f"{flag}: a duration cannot be negative, got {text!r}")
    return value


# the most ports one range (``-p 8000-8010:80``, Compose's ``"8000-8010:80"``) may name: as
# many as a service publishes (EndpointSpec.ports), so `-p 1-65535` is one clear error
MAX_PORT_RANGE = 256


def port_range(text: str) -> range:
    """``PORT`` or ``FIRST-LAST`` (1-65535, at most MAX_PORT_RANGE ports) → its ports.
    ValueError says why not; the caller names its flag or key."""
    lo, sep, hi = text.strip().partition("-")
    if not all(p.isascii() and p.isdigit() for p in ([lo, hi] if sep else [lo])):
        raise ValueError(f"{text!r} is not a port or a range FIRST-LAST")
    first, last = int(lo), int(hi or lo)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"{text!r} is out of range (ports are 1-65535)")
    if last < first:
        raise ValueError(f"the range {text!r} is reversed (write the lower port first)")
    if last - first >= MAX_PORT_RANGE:
        raise ValueError(f"the range {text!r} has {last - first + 1} ports: a service "
                         f"publishes at most {MAX_PORT_RANGE}")
    return range(first, last + 1)


def publish_ports(published: str, target: str, protocol: str) -> list[dict[str, Any]]:
    """The PortSpecs of PUBLISHED (a port, a range, or ""/"0": the managers assign each)
    and TARGET (a port or a range), as Docker's ``nat.ParsePortSpec`` and swarm
    ``ConvertPortToPortConfig`` pair them: ranges of one length port by port
    (``8000-8001:9000-9001`` → 8000→9000, 8001→9001); a published range with one target
    forwards every port of it to that target. ValueError says why not."""
    targets = port_range(target)
    if published in ("", "0"):
        return [{"published": 0, "target": t, "protocol": protocol} for t in targets]
    ports = port_range(published)
    if len(targets) == 1:
        return [{"published": p, "target": targets[0], "protocol": protocol} for p in ports]
    if len(ports) != len(targets):
        raise ValueError(f"{len(ports)} published ports for {len(targets)} targets: give "
                         "ranges of the same length, or one target port for the range")
    return [{"published": p, "target": t, "protocol": protocol}
            for p, t in zip(ports, targets, strict=True)]


def host_ip(text: str) -> str:
    """A published port's host address as Docker and Compose write it (``127.0.0.1``,
    ``[::1]``) → the spec's ``host_ip``: "" for every address (``0.0.0.0``, ``::``, none).
    ValueError for another IPv6 address (the routing mesh listens on IPv4 only); the spec
    checks the rest, naming the field."""
    text = text.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if bare in ("", "0.0.0.0", "::"):
        return ""
    from shoal.raft.spec import is_ipv6  # (the spec's own reading of one)

    if is_ipv6(bare):
        raise ValueError(f"{text!r}: IPv6 host addresses are not supported (the routing mesh "
                         "listens on IPv4 addresses only); give an IPv4 one, e.g. 127.0.0.1")
    return bare


def with_host_ip(ports: list[dict[str, Any]], address: str) -> list[dict[str, Any]]:
    """``ports`` (PortSpecs as dicts) at ``address`` (``host_ip``), unless that is ""."""
    return [{**p, "host_ip": address} for p in ports] if address else ports


def parse_publish(text: str, flag: str = "--publish") -> dict[str, Any]:
    """One port of ``--publish`` (``parse_publish_ports``); a range is refused here."""
    ports = parse_publish_ports(text, flag)
    if len(ports) != 1:
        raise CliError(f"{flag} {text!r} names {len(ports)} ports, expected one")
    return ports[0]


def parse_publish_ports(text: str, flag: str = "--publish") -> list[dict[str, Any]]:
    """Docker's ``--publish [[HOST_IP:]PUBLISHED:]TARGET[/tcp|udp]`` or
    ``published=..,target=..,protocol=..,mode=ingress,host_ip=..`` → its PortSpecs:
    PUBLISHED and TARGET may be ranges (``8000-8010:9000-9010``, ``8000-8010:80``;
    ``publish_ports``). No published port (``-p 80``, ``-p 127.0.0.1::80``): the managers
    assign one of 30000-32767. HOST_IP (``host_ip``): the address the port listens on, on
    each node that has it. ``mode=host`` (a port bound only where a task runs, without the
    routing mesh) marks each port ``"mode": "host"``: ``_with_host_ports`` moves them to
    ``endpoint.host_ports``."""
    usage = (f"{flag} expects [[HOST_IP:]PUBLISHED:]TARGET[/tcp|udp] or "
             f"published=N,target=N[,protocol=tcp|udp][,mode=ingress|host][,host_ip=IP] (a "
             f"port or a range FIRST-LAST each), got {text!r}")
    address = ""
    if "=" in text:
        kv = parse_kv(text.split(","), flag)
        unknown = set(kv) - {"published", "target", "protocol", "mode", "host_ip"}
        if unknown:
            raise CliError(f"{flag}: unknown option {sorted(unknown)[0]!r} in {text!r} "
                           "(expected published, target, protocol, mode, host_ip)")
        address = kv.get("host_ip", "")
        mode = kv.get("mode", "ingress")
        if mode not in ("ingress", "host"):
            raise CliError(f"{flag}: mode must be ingress or host, got {mode!r}")
        published, target, proto = kv.get("published", ""), kv.get("target", ""), \
            kv.get("protocol", "tcp")
        if mode == "host" and published in ("", "0"):
            raise CliError(f"{flag} {text!r}: mode=host needs published=N (shoal does not "
                           "pick a port for a host-mode one)")
    else:
        spec, _, proto = text.partition("/")
        if spec.startswith("["):  # ([::1]:80:80)
            address, _, spec = spec.partition("]")
            address, spec = address + "]", spec[1:] if spec.startswith(":") else "?"
        elif spec.count(":") == 2:  # (127.0.0.1:8080:80, 127.0.0.1::80)
            address, _, spec = spec.partition(":")
        elif spec.count(":") > 2:  # (an IPv6 address without brackets)
            address, published, target = spec.rsplit(":", 2)
            spec = f"{published}:{target}"
        published, _, target = spec.rpartition(":")
        mode = "ingress"
    try:
        address = host_ip(address)
    except ValueError as exc:
        raise CliError(f"{flag} {text!r}: {exc}") from None
    proto = proto.lower()  # (docker's 80/TCP)
    if not (re.fullmatch(r"([0-9]+(-[0-9]+)?)?", published)
            and re.fullmatch(r"[0-9]+(-[0-9]+)?", target)) or proto not in ("", "tcp", "udp"):
        raise CliError(usage)
    try:
        ports = publish_ports(published, target, proto or "tcp")
    except ValueError as exc:
        raise CliError(f"{flag} {text!r}: {exc}") from None
    ports = with_host_ip(ports, address)
    return [{**p, "mode": "host"} for p in ports] if mode == "host" else ports


def parse_expose(text: str, flag: str = "--expose") -> dict[str, Any]:
    """--expose PORT[/tcp|udp]."""
    port, _, proto = text.partition("/")
    if not (port.isascii() and port.isdigit()) or proto not in ("", "tcp", "udp"):
        raise CliError(f"{flag} expects PORT[/tcp|udp], got {text!r}")
    return {"port": int(port), "protocol": proto or "tcp"}


_MOUNT_KEYS = ("type", "src", "source", "dst", "destination", "target", "readonly", "ro",
               "tmpfs-size", "volume-driver", "volume-opt", "volume-nocopy")


def parse_mount(text: str, flag: str = "--mount") -> dict[str, Any]:
    """--mount type=bind|volume|tmpfs,src=...,dst=...[,readonly][,tmpfs-size=64M]
    [,volume-driver=local|sshfs][,volume-opt=K=V]...[,volume-nocopy] (Docker's;
    shoal.runtime.volumes); a volume without src is an anonymous one, made for the task."""
    out: dict[str, Any] = {"type": "volume"}
    # Docker reads --mount as CSV: "volume-opt=o=addr=10.0.0.5,rw" keeps its commas; unquoted,
    # items after volume-opt=o=... that are no --mount key continue o.
    last_opt = ""
    for part in next(csv.reader([text])) if text else []:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if last_opt == "o" and key not in _MOUNT_KEYS:
            out["volume_opts"]["o"] += "," + part
            continue
        last_opt = ""
        if key in ("readonly", "ro") and (not sep or value.lower() in ("1", "true")):
            out["readonly"] = True
        elif key == "volume-nocopy":  # (Docker's: alone, or =true|false)
            if sep and value.lower() not in ("1", "true", "0", "false"):
                raise CliError(f"{flag}: volume-nocopy is true or false, got {value!r}")
            out["nocopy"] = not sep or value.lower() in ("1", "true")
        elif key == "type":
            out["type"] = value
        elif key in ("src", "source"):
            out["source"] = value
        elif key in ("dst", "destination", "target"):
            out["target"] = value
        elif key == "tmpfs-size":
            out["tmpfs_size"] = parse_size(value, f"{flag} tmpfs-size")
        elif key == "volume-driver":
            out["volume_driver"] = value
        elif key == "volume-opt":  # Docker's: volume-opt=K=V, repeated
            k, eq, v = value.partition("=")
            if not k or not eq:
                raise CliError(f"{flag}: volume-opt expects KEY=VALUE, got {value!r}")
            out.setdefault("volume_opts", {})[k] = v
            last_opt = k
            continue
        else:
            raise CliError(f"{flag}: unknown option {part!r} in {text!r} (expected "
                           "type=bind|volume|tmpfs,src=...,dst=...[,readonly]"
                           "[,volume-driver=D][,volume-opt=K=V][,volume-nocopy])")
    if "target" not in out:
        raise CliError(f"{flag} {text!r}: dst=PATH is required")
    return out


def parse_file_ref(text: str, flag: str) -> dict[str, Any]:
    """Docker's --secret and --config: ``NAME`` or ``source=NAME[,target=PATH][,uid=N]
    [,gid=N][,mode=0440]`` (also src= and name=, and NAME first). What is not given is left
    out: the managers write Docker's defaults for a new reference (a config at /NAME, owned
    by 0:0) and keep the current ones' (shoal.raft.spec.docker_file_defaults)."""
    out: dict[str, Any] = {}
    for i, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep and i == 0:
            out["name"] = part
        elif key in ("source", "src", "name") and sep:
            out["name"] = value
        elif key == "target" and sep:
            out["target"] = value
        elif key in ("uid", "gid") and sep:
            out[key] = value.strip()
        elif key == "mode" and sep:
            try:
                out["mode"] = int(value.strip().removeprefix("0o"), 8)
            except ValueError:
                raise CliError(f"{flag}: mode must be octal (e.g. 0400), got {value!r}") \
                    from None
        else:
            raise CliError(f"{flag}: unknown option {part!r} in {text!r} (expected "
                           "NAME or source=NAME[,target=PATH][,uid=N][,gid=N][,mode=0400])")
    if not out.get("name"):
        raise CliError(f"{flag} {text!r}: a name is required (source=NAME)")
    return out


def file_ref_place(kind: str, ref: dict[str, Any]) -> str:
    """Where a reference puts its file, as --secret-add/--config-add compare them (a new one
    replaces the one at its place): an absolute target; a file name in /run/secrets for a
    secret; ``/NAME`` for a config, which is also where a config file name the service has
    in /run/configs from before schema 11 is compared (the managers keep it there)."""
    t = str(ref.get("target") or ref["name"])
    if t.startswith("/"):
        return t
    return f"/run/secrets/{t}" if kind == "secret" else f"/{t}"


def parse_constraint(text: str, flag: str) -> str:
    """A placement constraint in its canonical form (``node.labels.zone==b``)."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.validate import parse_constraint as parse

    try:
        return str(parse(text, flag))
    except ValidationError as exc:
        raise CliError(exc.message) from None


def parse_preference(text: str, flag: str) -> dict[str, Any]:
    """--placement-pref spread=node.labels.KEY (Docker's syntax; the API checks the label)."""
    kind, sep, value = text.partition("=")
    if not sep or kind.strip().lower() != "spread" or not value.strip():
        raise CliError(f"{flag} expects spread=node.labels.KEY, got {text!r}")
    return {"spread": value.strip()}


_AUTOSCALE_KEYS = {"min": "int", "max": "int", "cpu": "percent", "memory": "percent",
                   "window": "duration", "period": "duration", "stabilization": "duration",
                   "step": "int", "tolerance": "percent"}


def parse_autoscale(text: str, flag: str = "--autoscale") -> dict[str, Any]:
    """--autoscale min=N,max=N,cpu=P%[,memory=P%][,window=D][,period=D][,stabilization=D]
    [,step=N][,tolerance=P%] (percentages also as fractions: cpu=0.6); ``none`` or ``off``:
    autoscaling off."""
    if text.strip().lower() in ("none", "off", ""):
        return {}
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        kind = _AUTOSCALE_KEYS.get(key)
        if not sep or kind is None:
            raise CliError(f"{flag}: unknown option {part!r} in {text!r} (expected "
                           f"{', '.join(_AUTOSCALE_KEYS)}, e.g. min=2,max=20,cpu=60%)")
        if kind == "duration":
            out[key] = parse_duration(value, f"{flag} {key}")
            continue
        try:
            if kind == "int":
                out[key] = int(value)
            elif value.endswith("%"):
                out[key] = float(value[:-1]) / 100
            elif key in ("cpu", "memory", "tolerance") and float(value) > 1:
                # (Kubernetes' averageUtilization: 60 means 60 %; here it would be 6,000 %)
                raise CliError(f"{flag}: {key}={value}: write a percentage, {key}={value}% "
                               f"(or a fraction: {float(value) / 100:g})")
            else:
                out[key] = float(value)
        except ValueError:
            raise CliError(f"{flag}: {key} expects "
                           f"{'a whole number' if kind == 'int' else 'a percentage (60%)'}, "
                           f"got {value!r}") from None
    return out


def parse_cap(text: str, flag: str) -> str:
    """A capability as docker takes it (``net_admin``, ``CAP_NET_ADMIN``) → ``NET_ADMIN``."""
    from shoal.runtime.rootfs import cap_name

    try:
        return cap_name(text)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from None


def parse_host(text: str, flag: str) -> str:
    """docker's ``--host NAME:IP`` (also ``NAME=IP``) → ``NAME:IP``; the IP is checked by the
    spec."""
    name, sep, addr = text.replace("=", ":", 1).partition(":") if "=" in text.split(":")[0] \
        else text.partition(":")
    if not sep or not name or not addr:
        raise CliError(f"{flag} expects NAME:IP, got {text!r}")
    return f"{name}:{addr}"


def parse_ulimit(text: str, flag: str) -> dict[str, Any]:
    """docker's ``--ulimit NAME=SOFT[:HARD]`` (``nofile=1024:2048``; -1 = unlimited; a
    single value is both) → a spec Ulimit."""
    name, sep, limits = text.partition("=")
    soft, colon, hard = limits.partition(":")
    try:
        if not re.fullmatch(r"-?[0-9]+", soft) or (colon and not re.fullmatch(r"-?[0-9]+",
                                                                                hard)):
            raise ValueError(text)
        lo = int(soft)
        hi = int(hard) if colon else lo
    except ValueError:
        raise CliError(f"{flag} expects NAME=SOFT[:HARD] (whole numbers, -1 = unlimited), "
                       f"got {text!r}") from None
    if not sep or not name:
        raise CliError(f"{flag} expects NAME=SOFT[:HARD], got {text!r}")
    return {"name": name, "soft": lo, "hard": hi}


def network_opts(text: str, flag: str = "--network") -> tuple[str, list[str]]:
    """docker's ``--network NAME`` or ``--network name=NAME,alias=A[,alias=B...]`` → (the
    network, the service's aliases on it: more DNS names, ``task.network_aliases``)."""
    if "=" not in text:
        return text, []
    name, aliases = "", []
    for part in next(csv.reader([text])):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if key == "name" and sep:
            name = value.strip()
        elif key == "alias" and sep and value.strip():
            aliases.append(value.strip())
        else:
            raise CliError(f"{flag}: unknown option {part!r} in {text!r} (expected NAME or "
                           "name=NAME[,alias=ALIAS...])")
    if not name:
        raise CliError(f"{flag} {text!r}: name=NETWORK is required")
    return name, aliases


def _with_network_aliases(spec: dict[str, Any], path: str, texts: Sequence[str], flag: str,
                          gone: Sequence[str] = ()) -> None:
    """The aliases of ``--network name=N,alias=A`` values into the map of aliases beside the
    networks list at ``path`` (``task.networks`` → ``task.network_aliases``): a network
    given gets the aliases it is given with (none with the short form), as the list item
    replaces the one of the same name; the networks in ``gone`` (``--network-rm``) lose
    theirs."""
    target = path.rpartition(".")[0] + ".network_aliases"
    before = get_path(spec, target, {}) or {}
    aliases = {k: list(v) for k, v in before.items()}
    for text in texts:
        name, more = network_opts(text, flag)
        aliases[name] = list(dict.fromkeys(more))
    aliases = {k: v for k, v in aliases.items() if v and k not in gone}
    if aliases or before:
        set_path(spec, target, aliases)


def _with_host_ports(spec: dict[str, Any], path: str, texts: Sequence[str], flag: str,
                     gone: Sequence[str] = ()) -> None:
    """The ports of ``--publish mode=host,...`` values (marked ``"mode": "host"`` by
    ``parse_publish_ports``) moved from the list at ``path`` (``endpoint.ports``) to the
    host-mode list beside it (``endpoint.host_ports``): a port given replaces the host-mode
    one of the same published port and protocol, and the keys in ``gone``
    (``--publish-rm``) remove host-mode ones too."""
    target = path.rpartition(".")[0] + ".host_ports"
    before = list(get_path(spec, target, []) or [])
    items = list(get_path(spec, path, []) or [])
    added = [{k: v for k, v in p.items() if k != "mode"} for p in items
             if p.get("mode") == "host"]
    given = {f"{p['published']}/{p.get('protocol', 'tcp')}"
             for text in texts for p in parse_publish_ports(text, flag)} | set(gone)
    host = [p for p in before if f"{p['published']}/{p.get('protocol', 'tcp')}" not in given]
    if added:
        set_path(spec, path, [p for p in items if p.get("mode") != "host"])
    if added or len(host) != len(before):
        set_path(spec, target, host + added)


def _port_key(text: str, flag: str) -> str:
    """``PORT[/PROTOCOL]`` as ``--publish-rm``/``--expose-rm`` name one: ``8080/tcp``."""
    port, _, proto = text.strip().partition("/")
    proto = (proto or "tcp").lower()
    if not port.isdigit() or not 1 <= int(port) <= 65535 or proto not in ("tcp", "udp"):
        raise CliError(f"{flag}: expected PORT[/tcp|udp], got {text!r}")
    return f"{int(port)}/{proto}"


def _publish_rm_keys(text: str, flag: str) -> list[str]:
    """``--publish-rm PUBLISHED[/PROTOCOL]`` (what follows a ``:`` is ignored) → the keys
    it names; a range ``8000-8010`` names each of its ports."""
    spec, _, proto = text.strip().partition("/")
    proto = (proto or "tcp").lower()
    port = spec.split(":")[0]
    if not re.fullmatch(r"[0-9]+(-[0-9]+)?", port) or proto not in ("tcp", "udp"):
        raise CliError(f"{flag}: expected PORT[/tcp|udp] or a range FIRST-LAST[/tcp|udp], "
                       f"got {text!r}")
    try:
        return [f"{p}/{proto}" for p in port_range(port)]
    except ValueError as exc:
        raise CliError(f"{flag} {text!r}: {exc}") from None


# item kind → (parse one flag value, the key that --X-rm names, parse an --X-rm value); a
# value naming several items (``-p 8000-8010:80``) parses to a list of them, an --X-rm
# value naming several keys (``--publish-rm 8000-8010``) to a list of keys
ITEMS: dict[str, tuple[Callable[[str, str], Any], Callable[[Any], str],
                       Callable[[str, str], str | list[str]]]] = {
    "mount": (parse_mount, lambda m: str(m["target"]), lambda t, f: t),
    "port": (parse_publish_ports, lambda p: f"{p['published']}/{p.get('protocol', 'tcp')}",
             _publish_rm_keys),
    "expose": (parse_expose, lambda e: f"{e['port']}/{e.get('protocol', 'tcp')}",
               lambda t, f: _port_key(t, f)),
    "secret": (parse_file_ref, lambda r: str(r["name"]), lambda t, f: t),
    "config": (parse_file_ref, lambda r: str(r["name"]), lambda t, f: t),
    "constraint": (parse_constraint, str, parse_constraint),
    "preference": (parse_preference, lambda p: str(p["spread"]).lower(),
                   lambda t, f: str(parse_preference(t, f)["spread"]).lower()),
    "network": (lambda t, f: network_opts(t, f)[0], str, lambda t, f: t),
    "cap": (parse_cap, str, parse_cap),
    "group": (lambda t, f: t.strip(), str, lambda t, f: t.strip()),
    "host": (parse_host, str, lambda t, f: parse_host(t, f) if ":" in t or "=" in t
             else t.strip()),
    "ulimit": (parse_ulimit, lambda u: str(u["name"]), lambda t, f: t.partition("=")[0]),
    "nameserver": (lambda t, f: t.strip(), str, lambda t, f: t.strip()),  # (spec checks)
    "domain": (lambda t, f: t.strip(), str, lambda t, f: t.strip()),
    "resolv_option": (lambda t, f: t.strip(), str, lambda t, f: t.strip()),
    "autoscale": (parse_autoscale, str, lambda t, f: t),  # (cli "struct": one value)
}
# what an --X-add replaces, where that is not what --X-rm names: a secret or config added
# replaces the one at the same file name (`--secret-rm pw --secret-add source=pw2,target=pw`,
# Docker's rotation idiom, keeps every other reference to pw2); a port the managers are to
# assign (`--publish-add 81-83`) replaces one of its target, not the other unassigned ones
# what an --X-rm value removes, where that is not the items whose key it is: docker's
# `--host-rm db` removes every line of db, `--host-rm db:10.0.0.2` only that one
REMOVES: dict[str, Callable[[Any, str], bool]] = {
    "host": lambda line, rm: line == rm or (":" not in rm and line.partition(":")[0] == rm),
}
REPLACES: dict[str, Callable[[Any], str]] = {
    "port": lambda p: f"{p['published'] or 'to ' + str(p['target'])}/{p.get('protocol', 'tcp')}",
    "secret": lambda r: file_ref_place("secret", r),
    "config": lambda r: file_ref_place("config", r),
}
# list items whose flag values carry another field too: (spec, the list's path, the values
# given, the flag, the keys --X-rm named) → that field set in spec. docker's --network
# name=N,alias=A: the name is the item, the aliases go to task.network_aliases
CARRIES: dict[str, Callable[[dict[str, Any], str, Sequence[str], str, Sequence[str]], None]] = {
    "network": _with_network_aliases,
    "port": _with_host_ports,
}


def split_security_opt(text: str) -> tuple[str, str, str]:
    """A security option's key, separator and value as Docker splits them: at the first
    "=", or — without one — at the first ":" (``seccomp:unconfined``), so a profile's path
    may hold a ":"."""
    key, sep, value = text.partition("=")
    return (key, sep, value) if sep else text.partition(":")


def parse_security_opts(texts: Sequence[str], flag: str) -> str | None:
    """Docker's ``--security-opt`` values, given once or more (as ``docker run`` takes
    them), as the spec's ``seccomp`` value: "unconfined", "" (the default profile), the
    profile file's JSON (the spec check reads it), or None when none names seccomp (the
    spec keeps its value). ``seccomp=…`` (``seccomp:…`` too): the last one given wins;
    ``no-new-privileges`` (``=true``) is what shoal does for every task anyway."""
    setting: str | None = None
    for text in texts:
        key, sep, value = split_security_opt(text)
        key, value = key.strip(), value.strip()
        if key == "no-new-privileges" and value.lower() in ("", "true"):
            continue
        if key == "no-new-privileges":
            raise CliError(f"{flag}: {text!r}: shoal sets no-new-privileges for every task "
                           "(a process in a task cannot gain privileges through exec)")
        if key != "seccomp" or not sep or not value:
            raise CliError(f"{flag}: {text!r}: only seccomp=unconfined|default|PATH and "
                           "no-new-privileges are taken (shoal applies no AppArmor or "
                           "SELinux profile)")
        try:
            setting = seccomp_setting(value)
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"{flag}: cannot read the seccomp profile {value}: {exc}") from None
    return setting


def seccomp_setting(value: str, base: Path | None = None) -> str:
    """The spec's ``seccomp`` value for Docker's ``seccomp=VALUE``: "unconfined", "" for
    default/builtin, else the JSON of the profile file VALUE (relative to ``base``, ~
    expanded). OSError or UnicodeDecodeError if it cannot be read."""
    if value in ("unconfined", "default", "builtin"):
        return "unconfined" if value == "unconfined" else ""
    path = Path(value).expanduser()
    return (path if base is None or path.is_absolute() else base / path).read_text(
        encoding="utf-8")


def scalar(d: FieldDecl, text: Any, flag: str) -> Any:
    kind = d.cli
    if kind == "flag":
        return bool(text)
    if d.path == "task.container.stop_signal":  # (docker's "term" and "15" alike)
        text = str(text).strip().upper()
        return text if text.isdigit() or text.startswith("SIG") else f"SIG{text}"
    if kind == "str" or kind == "choice":
        return text
    if kind == "words":  # (as a shell splits it: --entrypoint 'sh -c'; "" = none)
        try:
            return shlex.split(text)
        except ValueError as exc:
            raise CliError(f"{flag}: {exc} in {text!r}") from None
    if kind == "bytes":
        return parse_size(text, flag)
    if kind == "duration":
        return parse_duration(text, flag)
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        what = "a whole number" if kind == "int" else "a number"
        raise CliError(f"{flag}: expected {what}, got {text!r}") from None


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def get_path(spec: dict[str, Any], path: str, default: Any) -> Any:
    node: Any = spec
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def as_list(value: Any) -> list[Any]:
    """A parser's result as a list (ITEMS: a value may name several items or keys)."""
    return value if isinstance(value, list) else [value]


def parsed_items(parse: Callable[[str, str], Any], texts: Sequence[str], flag: str
                  ) -> list[Any]:
    """The items of a list flag's values, in order (``-p 8000-8001:80`` gives two)."""
    return [item for text in texts for item in as_list(parse(text, flag))]
