"""`service inspect --pretty` and `node inspect --pretty`: the records as docker's pretty
templates show them (docker/cli's service and node formatters), for a person to read.

Owns: the text layout of one service view and one node view (shoal.node.views), fields
left out when empty as docker leaves them out. Must not touch: the API client, JSON output.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from shoal.cli.output import binary_size
from shoal.raft.spec import file_path

Rec = Mapping[str, Any]


def _duration(seconds: float) -> str:
    """Go's duration text: 5s, 1m30s, 500ms."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:g}s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


def _time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z") \
        if ts else ""


def _update(lines: list[str], title: str, cfg: Rec, order: str) -> None:
    lines.append(f"{title}:")
    lines.append(f" Parallelism:\t{cfg['parallelism']}")
    if cfg.get("delay"):
        lines.append(f" Delay:\t\t{_duration(cfg['delay'])}")
    lines.append(f" On failure:\t{cfg['failure_action']}")
    if cfg.get("monitor"):
        lines.append(f" Monitoring Period: {_duration(cfg['monitor'])}")
    lines.append(f" Max failure ratio: {cfg['max_failure_ratio']:g}")
    lines.append(f" {order} order:      {cfg['order']}")


def service(rec: Rec) -> str:
    """One service view (`service inspect`'s record) as docker's pretty template shows it."""
    spec = rec["spec"]
    task, mode = spec["task"], spec["mode"]
    lines = [f"ID:\t\t{rec['id']}", f"Name:\t\t{rec['name']}"]
    if spec.get("labels"):
        lines.append("Labels:")
        lines += [f" {k}={v}" if v else f" {k}" for k, v in sorted(spec["labels"].items())]
    kind = mode["type"]
    lines.append(f"Service Mode:\t{kind.replace('-', ' ').title().replace(' ', '')}")
    if kind in ("replicated", "replicated-job"):
        lines.append(f" Replicas:\t{mode['replicas']}")
    if kind.endswith("-job") and mode.get("max_concurrent"):
        lines.append(f" Max Concurrent:\t{mode['max_concurrent']}")
    if mode.get("schedule", {}).get("cron"):
        lines.append(f" Schedule:\t{mode['schedule']['cron']}")
    if mode.get("autoscale", {}).get("max"):
        a = mode["autoscale"]
        lines.append(f" Autoscale:\t{a['min']}-{a['max']}")
    status = rec.get("update_status") or {}
    if status.get("state"):
        lines += ["UpdateStatus:", f" State:\t\t{status['state']}"]
        if status.get("started_at"):
            lines.append(f" Started:\t{_time(status['started_at'])}")
        if status.get("completed_at"):
            lines.append(f" Completed:\t{_time(status['completed_at'])}")
        lines.append(f" Message:\t{status.get('message', '')}")
    placement = task["placement"]
    lines.append("Placement:")
    if placement.get("constraints"):
        lines.append(f" Constraints:\t[{' '.join(placement['constraints'])}]")
    if placement.get("preferences"):
        lines.append(" Preferences:\t[" + " ".join(
            f"spread={p['spread']}" for p in placement["preferences"]) + "]")
    if placement.get("max_replicas"):
        lines.append(f" Max Replicas Per Node:\t{placement['max_replicas']}")
    _update(lines, "UpdateConfig", spec["update"], "Update")
    _update(lines, "RollbackConfig", spec["rollback"], "Rollback")
    lines += _container(task)
    lines += _resources(task["resources"])
    nets = task.get("networks") or []
    if task.get("network_mode", "default") != "default":
        lines.append(f"Network Mode:\t{task['network_mode']}")
    if nets:
        aliases = task.get("network_aliases") or {}
        lines.append("Networks: " + " ".join(
            n + (f" (aliases: {', '.join(aliases[n])})" if aliases.get(n) else "")
            for n in nets))
    endpoint = spec["endpoint"]
    lines.append(f"Endpoint Mode:\t{endpoint['mode']}")
    if rec.get("vip"):
        lines.append(f" VIP:\t\t{rec['vip']}")
    if endpoint.get("ports") or endpoint.get("host_ports"):
        lines.append("Ports:")
        for mode, key in (("ingress", "ports"), ("host", "host_ports")):
            for p in endpoint.get(key) or ():
                lines += [f" PublishedPort = {p['published']}",
                          f"  Protocol = {p['protocol']}", f"  TargetPort = {p['target']}",
                          f"  PublishMode = {mode}"]
                if p.get("host_ip"):  # (the address it listens on, on each node with it)
                    lines.append(f"  HostIP = {p['host_ip']}")
    return "\n".join(lines)


def _container(task: Rec) -> list[str]:
    c = task["container"]
    lines = ["ContainerSpec:", f" Image:\t\t{c['image'] or '(the host: read-only /usr, /etc)'}"]
    if c.get("entrypoint"):
        lines.append(f" Entrypoint:\t{' '.join(c['entrypoint'])}")
    if c.get("command"):
        lines.append(f" Args:\t\t{' '.join(c['command'])} ")
    if c.get("env"):
        lines.append(" Env:\t\t" + " ".join(f"{k}={v}" for k, v in c["env"].items()) + " ")
    if c.get("workdir"):
        lines.append(f" Dir:\t\t{c['workdir']}")
    if c.get("user"):
        lines.append(f" User: {c['user']}")
    if c.get("hostname"):
        lines.append(f" Hostname:\t{c['hostname']}")
    if c.get("read_only"):
        lines.append(" Read Only:\ttrue")
    if c.get("tty"):
        lines.append(" TTY:\t\ttrue")
    if c.get("stdin_open"):
        lines.append(" OpenStdin:\ttrue")
    if c.get("oom_score_adj"):
        lines.append(f" OomScoreAdj:\t{c['oom_score_adj']}")
    if c.get("seccomp"):
        lines.append(" Seccomp:\t" + ("unconfined" if c["seccomp"] == "unconfined"
                                      else f"custom profile ({len(c['seccomp'])} bytes)"))
    if c.get("labels"):
        lines.append(" Labels:")
        lines.extend(f"  - {k}={v}" for k, v in c["labels"].items())
    if c.get("stop_signal", "SIGTERM") != "SIGTERM":
        lines.append(f" StopSignal:\t{c['stop_signal']}")
    if c.get("group_add"):
        lines.append(f" Groups:\t{' '.join(c['group_add'])}")
    if c.get("cap_add") or c.get("cap_drop"):
        lines.append("Capabilities:")
        if c.get("cap_add"):
            lines.append(f" Add: {', '.join(c['cap_add'])}")
        if c.get("cap_drop"):
            lines.append(f" Drop: {', '.join(c['cap_drop'])}")
    if c.get("sysctls"):
        lines.append("SysCtls:")
        lines += [f" {k}: {v}" for k, v in sorted(c["sysctls"].items())]
    if c.get("ulimits"):
        lines.append("Ulimits:")
        lines += [f" {u['name']}: {_limit(u['soft'])}:{_limit(u['hard'])}" for u in c["ulimits"]]
    if c.get("extra_hosts"):
        lines.append("Hosts:")
        lines += [f" {h}" for h in c["extra_hosts"]]
    if c.get("dns") or c.get("dns_search") or c.get("dns_options"):
        lines.append("DNS:")
        for key, title in (("dns", "Nameservers"), ("dns_search", "Search"),
                           ("dns_options", "Options")):
            if c.get(key):
                lines.append(f" {title}:\t{' '.join(c[key])}")
    if c.get("mounts"):
        lines.append("Mounts:")
        for m in c["mounts"]:
            lines += [f" Target:\t{m['target']}", f"  Source:\t{m['source']}",
                      f"  ReadOnly:\t{str(m['readonly']).lower()}", f"  Type:\t\t{m['type']}"]
    for kind in ("configs", "secrets"):
        if c.get(kind):
            lines.append(f"{kind.title()}:")
            for ref in c[kind]:
                # (docker's two lines; the target as the path the task sees)
                path = file_path(kind[:-1], ref.get("target") or "", ref["name"])
                lines += [f" Target:\t{path}", f"  Source:\t{ref['name']}"]
    if c.get("log_driver") or c.get("log_options"):
        lines.append("Log Driver:")
        if c.get("log_driver"):
            lines.append(f" Name:\t\t{c['log_driver']}")
        if c.get("log_options"):
            lines.append(" LogOpts:")
            lines += [f"  {k}:\t{v}" for k, v in sorted(c["log_options"].items())]
    check = c.get("healthcheck") or {}
    test = check.get("command") or " ".join(check.get("exec") or []) or \
        (f"http {check['http']}" if check.get("http") else "") or \
        (f"tcp {check['tcp']}" if check.get("tcp") else "")
    if check.get("disable"):
        lines.append(" Healthcheck:\tnone (disabled)")
    elif test:
        lines += [" Healthcheck:", f"  Interval = {_duration(check.get('interval') or 30)}",
                  f"  Retries = {check.get('retries') or 3}",
                  f"  StartPeriod =\t{_duration(check.get('start_period') or 0)}",
                  f"  Timeout =\t{_duration(check.get('timeout') or 30)}",
                  "  Tests:", f"\t Test = {test}"]
    for kind in ("init_containers", "sidecars"):
        for x in task.get(kind) or []:
            lines.append(f"{'Init container' if kind == 'init_containers' else 'Sidecar'}: "
                         f"{x['name']} ({x.get('image') or 'the host'}: "
                         f"{' '.join(x.get('command') or [])})")
    return lines


def _limit(n: int) -> str:
    return "unlimited" if n == -1 else str(n)


def _resources(res: Rec) -> list[str]:
    limits, reserved = res.get("limits") or {}, res.get("reservations") or {}
    lines: list[str] = []
    generic = reserved.get("generic_resources") or {}
    if reserved.get("cpu") or reserved.get("memory") or generic:
        lines.append(" Reservations:")
        if reserved.get("cpu"):
            lines.append(f"  CPU:\t\t{reserved['cpu']:g}")
        if reserved.get("memory"):
            lines.append(f"  Memory:\t{binary_size(reserved['memory'])}")
        for kind, n in generic.items():  # (docker's "Generic Resources" lines)
            lines.append(f"  {kind}:\t\t{n}")
    if limits.get("cpu") or limits.get("memory") or limits.get("pids"):
        lines.append(" Limits:")
        if limits.get("cpu"):
            lines.append(f"  CPU:\t\t{limits['cpu']:g}")
        if limits.get("memory"):
            lines.append(f"  Memory:\t{binary_size(limits['memory'])}")
        if limits.get("pids"):
            lines.append(f"  PIDs:\t\t{limits['pids']}")
    return ["Resources:", *lines] if lines else []


def node(rec: Rec) -> str:
    """One node view (`node inspect`'s record) as docker's pretty template shows it."""
    lines = [f"ID:\t\t\t{rec['id']}"]
    if rec.get("labels"):
        lines.append("Labels:")
        lines += [f" - {k}={v}" for k, v in sorted(rec["labels"].items())]
    lines += [f"Hostname:\t\t{rec['hostname']}", f"Joined at:\t\t{_time(rec['created_at'])}",
              "Status:", f" State:\t\t\t{str(rec['state']).title()}"]
    if rec.get("message"):
        lines.append(f" Message:\t\t{rec['message']}")
    lines += [f" Availability:\t\t{str(rec['availability']).title()}",
              f" Address:\t\t{rec['addr']}"]
    if rec.get("role") == "manager":
        lines += ["Manager Status:", f" Address:\t\t{rec['addr']}:{rec.get('raft_port', '')}",
                  f" Raft Status:\t\t"
                  f"{'Unreachable' if rec.get('manager_status') == 'unreachable' else 'Reachable'}",
                  f" Leader:\t\t{'Yes' if rec.get('manager_status') == 'leader' else 'No'}"]
    res = rec.get("resources") or {}
    platform = rec.get("platform") or {}
    lines += ["Platform:", f" Operating System:\t{platform.get('os') or 'linux'}"]
    if platform.get("architecture"):  # (docker's line; none before the node reported it)
        lines.append(f" Architecture:\t\t{platform['architecture']}")
    if res:
        lines += ["Resources:", f" CPUs:\t\t\t{res.get('cpus', 0):g}",
                  f" Memory:\t\t{binary_size(int(res.get('memory_bytes', 0)))}"]
        if res.get("reserved_cpus") or res.get("reserved_memory_bytes"):
            lines += [f" Reserved CPUs:\t\t{res.get('reserved_cpus', 0):g}",
                      f" Reserved Memory:\t{binary_size(int(res.get('reserved_memory_bytes', 0)))}"]
        taken = res.get("reserved_generic_resources") or {}
        for kind, value in (res.get("generic_resources") or {}).items():  # (Swarm's lines)
            have = ",".join(value) if isinstance(value, list) else value
            lines.append(f" {kind}:\t\t{have} (reserved {taken.get(kind.lower(), 0)})")
    lines += [f"Tasks:\t\t\t{rec.get('tasks', 0)}", f"Engine Version:\t\t{rec.get('version', '')}"]
    return "\n".join(lines)


__all__ = ["node", "service"]
