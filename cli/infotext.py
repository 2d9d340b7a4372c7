"""`shoal info` as text for a person (docker info's layout), from the agent's ``/v1/info``,
and `shoal version`.

Owns: ``render`` (the text) and ``choose`` (which output `info` prints: text on a terminal,
JSON otherwise — what scripts and the Ansible role read — unless ``--format`` says); and
`shoal version` (``version``: the CLI's and the agent's, docker version's layout). Must
not touch: the request (shoal.cli.main), the record's fields (the agent's, node/agent.py
``info``; a field it lacks is left out here, so an older agent's record still renders).
"""

from __future__ import annotations

from typing import Any

DEFAULT_HISTORY = 3  # the orchestrator's task history per slot when no limit is set


def choose(fmt: str | None, stdout: Any) -> str:
    """"text", "json" or a template: ``fmt`` when given, else text when ``stdout`` is a
    terminal, JSON otherwise."""
    if fmt:
        return fmt
    try:
        tty = bool(stdout.isatty())
    except (AttributeError, ValueError):  # (closed, or replaced by something without it)
        tty = False
    return "text" if tty else "json"


def render(info: dict[str, Any]) -> str:
    """The lines of docker info's kind: this node, its cluster, gossip, its task network."""
    out = [f"Node:            {info.get('hostname', '?')}"
           + (f" ({info['node_id']})" if info.get("node_id") else ""),
           f" Address:        {info.get('addr', '?')}, API port {info.get('api_port', '?')}",
           f" Version:        {info.get('version', '?')}"]
    if "schema" in info:
        out[-1] += f" (state schema {info['schema']}, cluster at {info.get('cluster_schema')})"
    out += _swarm(info)
    if info.get("member"):
        out += _gossip(info.get("gossip")) + _network(info.get("network"))
    if info.get("removed"):
        out.append(f"WARNING: {info['removed']}")
    return "\n".join(out)


def version(c: Any, fmt: str) -> None:
    """`shoal version` (docker version): the CLI's version, then the agent's — or, when it
    cannot be reached, why (CliError after the client part, as docker's)."""
    import json
    import platform
    import sys

    from shoal.cli.errors import CliError
    from shoal.cli.output import render_template
    from shoal.node.version import version as own

    client = {"Version": own(), "Python": platform.python_version(),
              "Os": sys.platform, "Arch": platform.machine()}
    try:
        info = c.call("GET", "/v1/info")
        server: dict[str, Any] | None = {"Version": info.get("version"),
                                         "Schema": info.get("schema"),
                                         "ClusterSchema": info.get("cluster_schema"),
                                         "Host": info.get("hostname")}
        failed: CliError | None = None
    except CliError as exc:
        server, failed = None, exc
    both = {"Client": client, "Server": server}
    if fmt == "json":
        print(json.dumps(both, indent=2))
    elif fmt != "text":
        print(render_template(fmt, both))
    else:
        print(f"Client:\n Version:        {client['Version']}\n Python:         "
              f"{client['Python']}\n OS/Arch:        {client['Os']}/{client['Arch']}")
        if server is not None:
            schema = f"{server['Schema']}" + (f" (the cluster writes {server['ClusterSchema']})"
                                              if server["ClusterSchema"] else "")
            print(f"\nServer: the agent on {server['Host']}\n Version:        "
                  f"{server['Version']}\n State schema:   {schema}")
    if failed is not None:
        raise failed


def _swarm(info: dict[str, Any]) -> list[str]:
    if info.get("locked"):
        return ["Swarm:           locked (`shoal unlock` with the unlock key)"]
    if not info.get("member"):
        stage = info.get("joining")
        return [f"Swarm:           {'joining: ' + stage if stage else 'inactive'}"]
    role = str(info.get("role", "?"))
    voters = info.get("voters") or []
    limit = info.get("task_history_limit")
    return [
        "Swarm:           active",
        f" Cluster ID:     {info.get('cluster_id', '?')}",
        f" Role:           {role}" + (" (the leader)" if info.get("is_leader") else ""),
        f" Ready:          {'yes' if info.get('ready') else 'no (no leader known yet)'}",
        f" Managers:       {len(voters)}" + (f" ({', '.join(voters)})" if voters else ""),
        f" Leader:         {info.get('leader') or 'none known'}",
        f" Raft:           term {info.get('term')}, index {info.get('index')}"
        if role == "manager" else
        f" State:          index {info.get('index')} (a copy fed by the managers)",
        " Task history:   " + (f"{limit} ended tasks a slot" if limit is not None else
                               f"not set ({DEFAULT_HISTORY} ended tasks a slot)"),
    ]


def _gossip(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return ["Gossip:          not running"]
    members = g.get("members") or {}
    keys = g.get("keys") or {}
    return [
        f"Gossip:          {g.get('addr')}, preset {g.get('preset')}, a probe every "
        f"{g.get('probe_interval')} s",
        " Members:        " + ", ".join(f"{n} {state}" for state, n in members.items()),
        f" Health score:   {g.get('health_score')} (0 is best)",
        f" Keys:           primary {keys.get('primary')}, "
        f"{len(keys.get('installed') or [])} installed",
    ]


def _network(n: dict[str, Any] | None) -> list[str]:
    if not n:
        return []
    out = [f"Network:         bridge {n.get('bridge', '?')}, subnet {n.get('subnet', '?')}, "
           f"gateway {n.get('gateway', '?')}" + ("" if n.get("ready") else " (not ready)"),
           f" Tasks here:     {len(n.get('tasks') or {})}",
           f" Routes:         {len(n.get('routes') or {})} (other nodes' task subnets)",
           f" Overlays:       {len((n.get('overlay') or {}).get('networks') or {})}"]
    errors = n.get("errors") or {}
    out += [f" Error ({what}):  {why}" for what, why in sorted(errors.items())]
    return out
