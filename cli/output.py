"""What the `shoal` lists print: tables, JSON, Go-style templates, ``-q``, ``--filter``,
``--no-trunc``.

Owns: the columns of every `ls`/`ps` (``COLUMNS``), Docker's filter keys for each
(``FILTERS``: one key's values are alternatives, different keys must all match), the
``--format table|json|TEMPLATE`` rendering (``{{.Field}}``, ``{{json .}}``, ``table
{{.A}}\\t{{.B}}`` with headers) and ``add_list_flags``/``show``, the pair every list command
uses. Ids are cut to 12 characters, long commands and errors to a column's width, unless
``--no-trunc``. Must not touch: the API client, cluster logic; it imports nothing heavy (it
is on the path of every `ls`).

Errors: ``CliError`` naming ``--filter`` or ``--format`` for a key or template it cannot use.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable

from shoal.cli.errors import CliError

TYPE_CHECKING = False  # (typing's, without importing typing at run time: see cli/main.py)
if TYPE_CHECKING:
    from typing import Any

    Rec = dict[str, Any]
    Column = tuple[str, Callable[[Rec, bool], str]]  # header, value(record, no_trunc)


def table(rows: list[list[str]], headers: list[str]) -> str:
    cols = [headers, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(headers))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cols]
    return "\n".join(lines)


def emit(data: Any, fmt: str, render: Any) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render(data))


def ago(ts: float | None) -> str:
    if not ts:
        return ""
    d = max(0.0, time.time() - ts)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if d >= size or unit == "second":
            n = int(d // size)
            return "less than a second ago" if unit == "second" and n == 0 else \
                f"{n} {unit}{'' if n == 1 else 's'} ago"
    return ""


def decimal_size(n: float, digits: int = 4) -> str:
    """Docker's decimal units (go-units' HumanSizeWithPrecision): "0B", "648B", "1.116GB"
    with 4 significant digits (HumanSize: `builder prune`'s reclaimed space), 3 for
    `stats`' I/O columns and `cp`'s "Successfully copied" ("1.23kB"); 999,999 B is "1MB",
    not "1e+03kB"."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if float(f"{n:.{digits}g}") < 1000 or unit == "PB":
            return f"{n:.{digits}g}{unit}"
        n /= 1000
    return f"{n}B"  # (not reached)


def binary_size(n: float) -> str:
    """Docker's binary units (go-units' BytesSize), 4 significant digits: "64MiB", "1.5GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if float(f"{n:.4g}") < 1024 or unit == "TiB":
            return f"{n:.4g}{unit}"
        n /= 1024
    return f"{n}B"  # (not reached)


_TEMPLATE_RE = re.compile(r"\{\{\s*(json\s+)?\.([A-Za-z0-9_.]*)\s*\}\}")


def inspect(fetch: Callable[[str], Rec], refs: list[str], fmt: str,
            pretty: Callable[[Rec], str] | None = None) -> None:
    """`X inspect REF...` as docker's: what was found — a JSON list, or ``--format
    TEMPLATE`` once per record (``{{.Spec.Name}}``, ``{{json .UpdateStatus}}``), or
    ``--pretty`` text (``pretty``) a blank line apart — then one error naming the refs that
    were not (exit 1)."""
    found: list[Rec] = []
    missing: list[str] = []
    for ref in refs:
        try:
            found.append(fetch(ref))
        except CliError as exc:
            missing.append(str(exc))
    if pretty is not None:
        if fmt not in ("", "json"):
            raise CliError("--pretty and --format: give one of them")
        print("\n\n".join(pretty(rec) for rec in found))
    elif fmt in ("", "json"):
        if found or not missing:
            print(json.dumps(found, indent=2))
    else:
        if "{{" not in fmt:
            raise CliError(f"--format: expected json or a template with {{{{.Field}}}}, "
                           f"got {fmt!r}")
        check_template(fmt, [], found)
        for rec in found:
            print(render_template(fmt, rec))
    if missing:
        raise CliError("; ".join(missing))


def each(refs: list[str], act: Callable[[str], Any]) -> None:
    """`X rm REF...` (and `service scale A=1 B=2`) as docker's: ``act`` on every ref, an
    error does not stop the others; what failed is reported together at the end (exit 1)."""
    failed: list[str] = []
    for ref in refs:
        try:
            act(ref)
        except CliError as exc:
            failed.append(str(exc))
    if failed:
        raise CliError("; ".join(failed))


def check_template(template: str, shown: list[str], items: list[Rec]) -> None:
    """Refuse, as docker does, a template this CLI cannot evaluate: an action other than
    ``{{.Field}}`` / ``{{json .Field}}`` (functions, pipes), braces left open, or a top-level
    field that neither a column (``shown``) nor any record has."""
    rest = _TEMPLATE_RE.sub("", template)
    if "{{" in rest or "}}" in rest:
        bad = re.search(r"\{\{.*?(\}\}|$)", rest)
        raise CliError(f"--format: cannot evaluate {bad.group(0) if bad else rest!r} (this "
                       "CLI's templates take {{.Field}}, {{.Field.key}}, {{json .}} and "
                       "{{json .Field}}, optionally after 'table ')")
    known = {f.lower() for f in shown} | {str(k).lower().replace("_", "") for r in items
                                          for k in r}
    for m in _TEMPLATE_RE.finditer(template):
        top = m.group(2).split(".")[0].lower()
        if top and items and top not in known:
            raise CliError(f"--format: no field {m.group(2).split('.')[0]!r} (fields: "
                           f"{', '.join(shown)}, or any field of --format json)")
        if top in {f.lower() for f in shown}:
            continue  # (a column as shown: .Replicas, .DesiredState)
        misses = [_missing(r, [p for p in m.group(2).split(".") if p]) for r in items]
        if items and all(misses):  # (a field deeper down: docker's "can't evaluate field")
            where, name, have = next(x for x in misses if x)
            raise CliError(f"--format: no field {name!r} in {where} (fields there: "
                           f"{', '.join(have) or 'none'})")


# maps whose keys are the user's (a label that is not set prints <no value>, as a Go map's)
_USER_MAPS = frozenset({"labels", "attributes", "options", "driveropts", "containerlabels"})


def _missing(rec: Rec, parts: list[str]) -> tuple[str, str, list[str]] | None:
    """Where the field path ``parts`` leaves ``rec``'s structure: (the path so far, the
    missing name, the names there), or None (found, a user map's key, or a null on the way)."""
    value: Any = rec
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            return None
        want = part.lower()
        key = next((k for k in value if str(k).lower().replace("_", "") == want), None)
        if key is None:
            parent = parts[i - 1].lower().replace("_", "") if i else ""
            if parent in _USER_MAPS:
                return None
            return ("." + ".".join(parts[:i]), part, sorted(str(k) for k in value))
        value = value[key]
    return None


def render_template(template: str, rec: Rec) -> str:
    """docker-style ``--format``: ``{{.Field}}``, ``{{.Attributes.key}}``, ``{{json .}}``,
    ``{{json .Attributes}}``; field names match case-insensitively (``.ID`` = ``id``)."""
    def field(m: re.Match[str]) -> str:
        value: Any = rec
        for part in [p for p in m.group(2).split(".") if p]:
            if not isinstance(value, dict):
                value = None
                break
            want = part.lower()  # (.UpdateStatus = update_status, .ID = id)
            key = next((k for k in value if str(k).lower().replace("_", "") == want), None)
            value = value.get(key) if key is not None else None
        if m.group(1):
            return json.dumps(value)
        if value is None:
            return "<no value>"
        return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return _TEMPLATE_RE.sub(field, template.replace("\\n", "\n").replace("\\t", "\t"))


# ----------------------------------------------------------------------------- columns

def _id(r: Rec, full: bool) -> str:
    return str(r["id"]) if full else str(r["id"])[:12]


def _cut(text: str, n: int, full: bool) -> str:
    return text if full or len(text) <= n else text[:n - 3] + "..."


def _replicas(s: Rec) -> str:
    """REPLICAS as docker's: running/wanted, and "(max N per node)"; a job: running/to run
    now, then "(completed/total completed)"; a scheduled job: of its current run, and when
    the next one starts (UTC)."""
    if "completed" in s:
        total, done = s["replicas"], s["completed"]
        left = max(0, total - done)
        now = min(left, s["max_concurrent"]) if s.get("max_concurrent") else left
        nxt = (s.get("schedule") or {}).get("next_run")
        at = f", next run {time.strftime('%H:%M:%S', time.gmtime(nxt))}Z" if nxt else ""
        return f"{s['running']}/{now} ({done}/{total} completed{at})"
    if s.get("max_replicas_per_node"):
        return f"{s['running']}/{s['replicas']} (max {s['max_replicas_per_node']} per node)"
    return f"{s['running']}/{s['replicas']}"


def _ports(s: Rec) -> str:
    return ", ".join(f"{p.get('host_ip') or '*'}:{p['published']}->{p['target']}/"
                     f"{p['protocol']}" for p in s.get("ports") or [])


def _task_state(t: Rec) -> str:
    state = f"{t['state'].capitalize()} {ago(t.get('state_since'))}".rstrip()
    if t.get("health") and t["state"] == "running":
        state += f" ({t['health']})"
    sidecars = [c for c in t.get("containers") or () if c.get("kind") == "sidecar"]
    if sidecars and t["state"] == "running":  # a pod: its sidecars up, and their restarts
        up = sum(c.get("state") == "running" for c in sidecars)
        restarts = sum(int(c.get("restarts") or 0) for c in sidecars)
        state += f" [sidecars {up}/{len(sidecars)}" + \
            (f", {restarts} restarts]" if restarts else "]")
    return state


def _task_error(t: Rec, full: bool) -> str:
    err = t.get("error") or (t.get("message") or "" if t["state"] in (
        "orphaned", "rejected", "pending", "preparing") else "")
    return _cut(err, 50, full)


def _usage(t: Rec, key: str) -> str:
    u = t.get("usage") or {}
    if u.get(key) is None:
        return ""
    return f"{u[key] / 2**20:.1f}MiB" if key == "memory_bytes" else f"{u[key]:.2f}s"


COLUMNS: dict[str, list[Column]] = {
    "node": [
        ("ID", _id), ("HOSTNAME", lambda n, f: n["hostname"]),
        ("ADDRESS", lambda n, f: n["addr"]),
        ("STATUS", lambda n, f: n["state"].capitalize()),
        ("AVAILABILITY", lambda n, f: n["availability"].capitalize()),
        ("MANAGER STATUS", lambda n, f: n["manager_status"].capitalize()),
        ("MEMBERSHIP", lambda n, f: str(n.get("membership", "")).capitalize()),
        ("TASKS", lambda n, f: str(n["tasks"])), ("VERSION", lambda n, f: n.get("version", "")),
    ],
    "service": [
        ("ID", _id), ("NAME", lambda s, f: s["name"]), ("MODE", lambda s, f: s["mode"]),
        ("REPLICAS", lambda s, f: _replicas(s)),
        ("IMAGE", lambda s, f: _cut(s.get("image") or "-", 40, f)),
        ("PORTS", lambda s, f: _ports(s)),
        ("COMMAND", lambda s, f: _cut(" ".join(s["command"]), 40, f)),
    ],
    "task": [
        ("ID", _id), ("NAME", lambda t, f: t["name"]),
        ("IMAGE", lambda t, f: _cut(t.get("image") or "-", 30, f)),
        ("NODE", lambda t, f: t["node"] or "-"),
        ("DESIRED STATE", lambda t, f: t["desired_state"].capitalize()),
        ("CURRENT STATE", lambda t, f: _task_state(t)),
        ("MEM", lambda t, f: _usage(t, "memory_bytes")),
        ("CPU", lambda t, f: _usage(t, "cpu_seconds")),
        ("ERROR", _task_error),
    ],
    "secret": [
        ("ID", _id), ("NAME", lambda o, f: o["name"]),
        ("CREATED", lambda o, f: ago(o.get("created_at"))),
        ("UPDATED", lambda o, f: ago(o.get("updated_at"))),
    ],
    "network": [
        ("NETWORK ID", _id), ("NAME", lambda n, f: n["name"]),
        ("DRIVER", lambda n, f: n["driver"]), ("SUBNET", lambda n, f: n["subnet"]),
        ("GATEWAY", lambda n, f: n["gateway"]), ("VNI", lambda n, f: str(n["vni"])),
        ("INTERNAL", lambda n, f: "yes" if n["internal"] else ""),
        ("SERVICES", lambda n, f: str(len(n.get("services", [])))),
    ],
    "image": [
        ("IMAGE", lambda i, f: ", ".join(i["tags"]) or "<none>"),
        ("ID", lambda i, f: str(i["id"]) if f else str(i["id"])[7:19]),
        ("LAYERS", lambda i, f: str(i["layers"])),
        ("SIZE", lambda i, f: f"{i['size'] / 1e6:.1f} MB"),
    ],
    "stack": [("NAME", lambda r, f: r["name"]), ("SERVICES", lambda r, f: str(r["services"]))],
    "user": [("NAME", lambda u, f: u["name"]), ("ROLE", lambda u, f: u["role"]),
             ("PASSWORD", lambda u, f: "yes" if u["password"] else "no"),
             ("TOKEN", lambda u, f: "yes" if u["token"] else "no"),
             ("UPDATED", lambda u, f: ago(u.get("updated_at")) or "-")],
    "volume": [("NAME", lambda v, f: v["name"]), ("DRIVER", lambda v, f: v["driver"]),
               ("SCOPE", lambda v, f: v["scope"]),
               ("SERVICES", lambda v, f: str(len(v.get("services", []))))],
}
COLUMNS["config"] = COLUMNS["secret"]
# `stack services` / `stack ps`, as `docker stack services|ps`
COLUMNS["stack_service"] = [*COLUMNS["service"][:4], ("IMAGE", lambda s, f: s.get("image") or "-"),
                            ("PORTS", lambda s, f: _ports(s))]
COLUMNS["stack_task"] = [c for c in COLUMNS["task"] if c[0] not in ("MEM", "CPU")]


# ----------------------------------------------------------------------------- filters

def _prefix(key: str) -> Callable[[Rec, str], bool]:
    return lambda r, v: str(r.get(key, "")).startswith(v)


def _prefix_any_case(key: str) -> Callable[[Rec, str], bool]:
    """(a service's name: unique whatever its case, and filtered so, as Swarm's)"""
    return lambda r, v: str(r.get(key, "")).lower().startswith(v.lower())


def _exact(key: str) -> Callable[[Rec, str], bool]:
    return lambda r, v: str(r.get(key, "")).lower() == v.lower()


def _labels(r: Rec) -> dict[str, str]:
    return dict(r.get("labels") or (r.get("spec") or {}).get("labels") or {})


def _label(r: Rec, v: str) -> bool:
    """``label=KEY`` (has it) or ``label=KEY=VALUE``."""
    key, sep, value = v.partition("=")
    labels = _labels(r)
    return key in labels and (not sep or labels[key] == value)


def unused(r: Rec) -> bool:
    """A network's or volume's record no service nor live task uses (an implicit one is
    listed only while something uses it): Docker's ``dangling``, what ``prune`` removes."""
    return not (r.get("services") or r.get("tasks") or r.get("implicit"))


def _name_or_id(r: Rec, v: str) -> bool:
    return str(r.get("id", "")).startswith(v) or r.get("name") == v or r.get("node") == v \
        or r.get("node_id", "").startswith(v)


_TASK_FILTERS: dict[str, Callable[[Rec, str], bool]] = {
    "id": _prefix("id"), "name": _prefix("name"),
    "node": lambda t, v: t.get("node") == v or str(t.get("node_id", "")).startswith(v),
    "desired-state": lambda t, v: (v.lower() == "accepted" and t["desired_state"] in (
        "new", "pending", "assigned")) or t["desired_state"] == v.lower(),
    "service": lambda t, v: str(t.get("service", "")).lower() == v.lower()
    or str(t.get("service_id", "")).startswith(v),
}

FILTERS: dict[str, dict[str, Callable[[Rec, str], bool]]] = {
    "node": {"id": _prefix("id"), "name": _prefix("hostname"), "label": _label,
             "node.label": _label, "role": _exact("role"), "membership": _exact("membership"),
             "availability": _exact("availability"), "status": _exact("state")},
    "service": {"id": _prefix("id"), "name": _prefix_any_case("name"), "label": _label,
                "mode": _exact("mode")},
    "task": _TASK_FILTERS,
    "secret": {"id": _prefix("id"), "name": _prefix("name"), "label": _label},
    "user": {"name": _prefix("name"), "role": _exact("role")},
    "volume": {"name": _prefix("name"), "driver": _exact("driver"), "label": _label,
               "scope": _exact("scope"),
               "dangling": lambda r, v: unused(r) == (v.lower() in ("true", "1"))},
    "network": {"id": _prefix("id"), "name": _prefix("name"), "label": _label,
                "driver": _exact("driver"), "scope": lambda n, v: v == "swarm",
                "type": lambda n, v: v == "custom"},
    "image": {"reference": lambda i, v: any(t == v or t.split(":")[0] == v or
                                            re.fullmatch(v.replace("*", ".*"), t)
                                            for t in i.get("tags") or []),
              "id": lambda i, v: str(i.get("id", "")).split(":")[-1].startswith(
                  v.split(":")[-1])},
    "stack": {"name": _prefix("name")},
}
FILTERS["config"] = FILTERS["secret"]
FILTERS["stack_service"] = FILTERS["service"]
FILTERS["stack_task"] = FILTERS["task"]


def parse_filters(items: list[str], kind: str) -> dict[str, list[str]]:
    """``--filter KEY=VALUE`` list → {key: [values]}; an unknown key is an error."""
    known = FILTERS[kind]
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise CliError(f"--filter expects KEY=VALUE, got {item!r}")
        if key not in known:
            raise CliError(f"--filter: invalid filter {key!r} (valid here: "
                           f"{', '.join(sorted(known))})")
        allowed = FILTER_VALUES.get((kind, key))
        if allowed is not None and value.lower() not in allowed:
            raise CliError(f"--filter: invalid {key} {value!r} (valid: "
                           f"{', '.join(allowed)})")
        out.setdefault(key, []).append(value)
    return out


# the values a filter with a fixed set takes (Docker refuses others, as this does)
FILTER_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("task", "desired-state"): ("running", "shutdown", "accepted", "complete", "remove"),
    ("node", "role"): ("manager", "worker"),
    ("node", "availability"): ("active", "pause", "drain"),
    ("node", "membership"): ("alive", "suspect", "dead", "left", "unknown"),
    ("node", "status"): ("ready", "down", "unknown"),
    ("service", "mode"): ("replicated", "global", "replicated-job", "global-job"),
    ("user", "role"): ("viewer", "operator", "admin"),
    ("volume", "dangling"): ("true", "false", "1", "0"),
}


def matches(rec: Rec, filters: dict[str, list[str]], kind: str) -> bool:
    known = FILTERS[kind]
    return all(any(known[k](rec, v) for v in vals) for k, vals in filters.items())


# ----------------------------------------------------------------------------- list commands

def add_list_flags(parser: argparse.ArgumentParser, kind: str, quiet: bool = True) -> None:
    """``-q``, ``-f/--filter``, ``--format``, ``--no-trunc`` of a list of ``kind``."""
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="print only ids")
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                        help=f"keep what matches ({', '.join(sorted(FILTERS[kind]))}; "
                        "repeatable: one key's values are alternatives)")
    parser.add_argument("--format", default="table", metavar="table|json|TEMPLATE",
                        help="table (default), json, or a Go-style template such as "
                        "'{{.ID}} {{.Name}}' or '{{json .}}' ('table ...' adds headers)")
    parser.add_argument("--no-trunc", action="store_true",
                        help="do not cut ids, commands and errors")


def _field_name(header: str) -> str:
    return "".join(w.capitalize() if w != "ID" else w for w in header.split())


def template_record(rec: Rec, columns: list[Column], full: bool) -> Rec:
    """What a template sees: the columns as shown (``.ID``, ``.Replicas``, ``.DesiredState``)
    first, then the API record's own fields."""
    shown = {_field_name(h): fn(rec, full) for h, fn in columns}
    return {**shown, **{k: v for k, v in rec.items() if k.lower() not in
                        {s.lower() for s in shown}}}


def render(items: list[Rec], kind: str, fmt: str = "table", quiet: bool = False,
           no_trunc: bool = False) -> str:
    """The text a list prints (without the final newline)."""
    columns = COLUMNS[kind]
    if quiet:
        if kind in ("stack", "volume", "user"):  # (named, as docker's)
            return "\n".join(str(r["name"]) for r in items)
        ids = [str(r["id"]) for r in items]
        if kind == "image" and not no_trunc:  # sha256:HEX → HEX[:12], as `docker images -q`
            ids = [i.rpartition(":")[2] for i in ids]
        return "\n".join(i if no_trunc else i[:12] for i in ids)
    if fmt == "json":
        return json.dumps(items, indent=2)
    if fmt == "table" or not fmt:
        return table([[fn(r, no_trunc) for _, fn in columns] for r in items],
                     [h for h, _ in columns])
    if "{{" not in fmt:
        raise CliError(f"--format: expected table, json or a template with {{{{.Field}}}}, "
                       f"got {fmt!r}")
    with_header = fmt.startswith("table ")
    template = fmt[len("table "):] if with_header else fmt
    check_template(template, [_field_name(h) for h, _ in columns], items)
    lines = [render_template(template, template_record(r, columns, no_trunc)) for r in items]
    if not with_header:
        return "\n".join(lines)
    headers = {_field_name(h).lower(): h for h, _ in columns}
    header = _TEMPLATE_RE.sub(lambda m: headers.get(m.group(2).lower(), m.group(2).upper()),
                              template.replace("\\t", "\t").replace("\\n", "\n"))
    cells = [line.split("\t") for line in [header, *lines]]
    width = max(len(c) for c in cells)
    cells = [c + [""] * (width - len(c)) for c in cells]
    return table(cells[1:], cells[0])


def show(items: list[Rec], args: argparse.Namespace, kind: str) -> None:
    """Filter ``items`` by ``args.filter`` and print them as ``args`` asks."""
    filters = parse_filters(getattr(args, "filter", None) or [], kind)
    kept = [r for r in items if matches(r, filters, kind)]
    text = render(kept, kind, getattr(args, "format", "table"), getattr(args, "quiet", False),
                  getattr(args, "no_trunc", False))
    if text or not getattr(args, "quiet", False):
        print(text)
