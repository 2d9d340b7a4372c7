"""`shoal stack deploy|ls|ps|services|rm`: applications from Compose files.

Owns: the stack commands. A deploy is done by the CLI over the existing API (service
create/update/rm, secret/config create), as `docker stack deploy` does: the Compose file is read
and translated here (shoal.cli.compose), every service spec is validated by the API's own code
before the first write, and the cluster's current objects are read to plan the deploy
(``plan_deploy``, a pure function): create what is new, update only the services whose spec
changed (the update rolls out per the service's update config), keep the rest, and with
``--prune`` remove the stack's services the file no longer has. Why client-side and not a
server endpoint: it needs no new API surface or replicated state (a stack is only a label on
services, secrets and configs, ``com.docker.stack.namespace``), works unchanged against any
manager over the remote API, and the files it reads (secrets, env files, ``.env``) are on the
user's machine, not the manager's. The cost — a deploy is a sequence of writes, not one
transaction — is bounded by checking everything that can be checked (specs, names owned by
another stack or by no stack, external secrets, published-port conflicts, changed configs)
before the first write; the services with ``build:`` are built (shoal.cli.compose_build) after
those checks and before that write. Must not touch: the spec translation (shoal.cli.compose),
cluster logic.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from shoal.cli.errors import CliError

if TYPE_CHECKING:  # (imported where used: `shoal` builds this parser on every run, and
    # compose/msgspec/the spec cost more to import than a `service ls` may take)
    from collections.abc import Mapping
    from pathlib import Path

    from shoal.cli.compose import FileObject, NetworkObject, Stack
    from shoal.raft.spec import ServiceSpec

STACK_LABEL = "com.docker.stack.namespace"  # (as shoal.cli.compose.STACK_LABEL)


def label_of(obj: Any) -> str:
    """The stack an API object belongs to (shoal.cli.compose.label_of)."""
    labels = obj.get("labels") or (obj.get("spec") or {}).get("labels") or {}
    return str(labels.get(STACK_LABEL, ""))


class Client(Protocol):
    """What the stack commands need of shoal.cli.main.Client (not imported: main imports
    this module)."""

    def call(self, method: str, path: str, body: Any = None) -> Any: ...


# ----------------------------------------------------------------------------- planning

class Plan:
    """What a deploy writes, in order: prune, objects, creates, updates. (A plain class,
    not a dataclass: this module is imported by every `shoal` run.)"""

    def __init__(self) -> None:
        self.remove: list[str] = []  # services (--prune)
        self.networks: list[NetworkObject] = []  # networks to create
        self.objects: list[FileObject] = []  # secrets/configs to create
        self.create: list[ServiceSpec] = []
        self.update: list[tuple[ServiceSpec, int]] = []  # (spec, version)
        self.unchanged: list[str] = []
        self.warnings: list[str] = []
        # the stack's secrets/configs no longer in the file nor used by a service (an older
        # version of a changed file): removed after the updates; (kind, id, name)
        self.stale: list[tuple[str, str, str]] = []


def same_spec(current: ServiceSpec, new: ServiceSpec) -> bool:
    """Does deploying ``new`` change nothing? (``force_update`` is the cluster's counter, not
    the file's: it is carried over.)"""
    import msgspec

    from shoal.raft.spec import FILE_TARGETS, docker_file_defaults
    image = new.task.container.image
    pinned = current.task.container.image
    if image and "@" not in image and pinned.startswith(image + "@sha256:"):
        # the managers pinned the file's tag to a digest (--resolve-image): the same image
        # as far as the file says; a moved tag is taken by `service update --image`
        image = pinned
    # the file's secrets and configs as the managers would write them over the current
    # ones (shoal.raft.spec.docker_file_defaults: `configs: [site]` is /site, 0:0, or stays
    # where a running service has it); below schema 11 they keep what they have the same way
    c, was = new.task.container, current.task.container
    try:
        container = msgspec.structs.replace(
            c, image=image,
            secrets=docker_file_defaults(c.secrets, "secret", was.secrets, FILE_TARGETS),
            configs=docker_file_defaults(c.configs, "config", was.configs, FILE_TARGETS))
    except ValueError:  # (two files at one path once placed: the managers will say)
        return False
    carried = msgspec.structs.replace(new, task=msgspec.structs.replace(
        new.task, container=container, force_update=current.task.force_update))
    return carried == current


def plan_deploy(stack: Stack, services: list[dict[str, Any]],
                objects: dict[str, list[dict[str, Any]]], prune: bool,
                networks: list[dict[str, Any]] | None = None) -> Plan:
    """The writes that make the cluster hold ``stack``, or a CliError before any write.

    ``services``: every service of the cluster as `service inspect` shows it; ``objects``:
    ``{"secret": [...], "config": [...]}`` as `secret ls` / `config inspect` show them
    (configs with their ``data``); ``networks``: as `network ls` shows them."""
    import base64

    import msgspec

    from shoal.raft.errors import ValidationError
    from shoal.raft.spec import NETWORK_MODES
    from shoal.raft.validate import validate_spec

    plan = Plan()
    have_nets = {n["name"]: n for n in networks or []}
    for net in stack.networks:
        cur = have_nets.get(net.name)
        if net.external:
            if cur is None and net.name not in NETWORK_MODES:  # (Swarm's `name: host`)
                raise CliError(f"networks.{net.key}: external network {net.name!r} not found "
                               "(create it with `shoal network create`)")
        elif cur is None:
            plan.networks.append(net)
        elif label_of(cur) != stack.name:
            raise CliError(f"networks.{net.key}: a network named {net.name!r} exists and is "
                           f"not part of stack {stack.name}")
    # (a service's name is unique, and found, whatever its case)
    by_name = {s["name"].lower(): s for s in services}
    wanted = {s.name.lower() for s in stack.services}
    for s in services:
        if label_of(s) == stack.name and s["name"].lower() not in wanted and prune:
            plan.remove.append(s["name"])
    for kind, declared in (("secret", stack.secrets), ("config", stack.configs)):
        have = {o["name"]: o for o in objects[kind]}
        for obj in declared:
            cur = have.get(obj.name)
            if obj.external:
                if cur is None:
                    raise CliError(f"{kind}s.{obj.key}: external {kind} {obj.name!r} not "
                                   f"found (create it with `shoal {kind} create`)")
                continue
            if cur is None:
                plan.objects.append(obj)
            elif label_of(cur) != stack.name:
                raise CliError(f"{kind}s.{obj.key}: a {kind} named {obj.name!r} exists and "
                               f"is not part of stack {stack.name}")
            elif kind == "config" and "data" in cur and \
                    base64.b64decode(cur["data"]) != obj.data:
                raise CliError(f"configs.{obj.key}: config {obj.name} changed, and a config "
                               "cannot be changed: give it a new name (e.g. name: "
                               f"{obj.name}_v2) and redeploy")
    plan.stale = _stale_objects(stack, services, objects, plan.remove)
    ports: dict[tuple[int, str], str] = {}
    for s in services:
        if s["name"].lower() in wanted or s["name"] in plan.remove:
            continue
        for p in (s.get("spec") or {}).get("endpoint", {}).get("ports", []):
            ports[(int(p["published"]), p.get("protocol", "tcp"))] = s["name"]
    for spec in stack.services:
        for p in spec.endpoint.ports:
            other = ports.setdefault((p.published, p.protocol), spec.name)
            if other != spec.name:
                raise CliError(f"services.{spec.name[len(stack.name) + 1:]}.ports: port "
                               f"{p.published}/{p.protocol} is already published by service "
                               f"{other}")
        cur = by_name.get(spec.name.lower())
        if cur is None:
            plan.create.append(spec)
            continue
        if label_of(cur) != stack.name:
            owner = label_of(cur)
            raise CliError(f"service {cur['name']} exists and is not part of stack "
                           f"{stack.name}" + (f" (it is in stack {owner})" if owner else ""))
        if cur["name"] != spec.name:
            raise CliError(f"services.{spec.name[len(stack.name) + 1:]}: service "
                           f"{cur['name']} exists, and a service's name is unique whatever "
                           "its case (a service cannot be renamed: keep the key's case, or "
                           f"remove {cur['name']} first)")
        try:
            current = validate_spec(cur["spec"])
        except ValidationError:
            current = None  # (a spec this client cannot read: replace it)
        if current is not None and current.task.container.registry_auth:
            # (a deploy without --with-registry-auth keeps what the service has, as docker's
            # and `service update` do: turning it off would roll every task)
            spec = with_auth(spec)
        if current is not None and current.mode.autoscale.enabled:
            if spec.mode.autoscale.enabled:  # (the count is the autoscaler's now)
                spec = msgspec.structs.replace(spec, mode=msgspec.structs.replace(
                    spec.mode, replicas=current.mode.replicas))
            else:
                plan.warnings.append(
                    f"service {spec.name} is autoscaled, and the file does not say so: this "
                    "deploy turns autoscaling off (declare it with x-shoal-autoscale)")
        if current is not None and same_spec(current, spec):
            plan.unchanged.append(spec.name)
        else:
            plan.update.append((spec, int(cur["version"])))
    return plan


def _stale_objects(stack: Stack, services: list[dict[str, Any]],
                   objects: dict[str, list[dict[str, Any]]], removed: list[str]
                   ) -> list[tuple[str, str, str]]:
    """The stack's secrets/configs that neither the file declares nor any service will use
    once the deploy is done (the stack's services take their specs from the file)."""
    from shoal.raft.models import to_dict

    wanted = {s.name for s in stack.services}
    used: set[tuple[str, str]] = set()
    specs = [to_dict(s) for s in stack.services] + [
        s.get("spec") or {} for s in services if s["name"] not in wanted | set(removed)]
    for spec in specs:
        container = (spec.get("task") or {}).get("container") or {}
        for kind in ("secret", "config"):
            used.update((kind, str(r.get("name"))) for r in container.get(f"{kind}s") or [])
    declared = {(o.kind, o.name) for o in [*stack.secrets, *stack.configs]}
    return [(kind, str(o["id"]), str(o["name"]))
            for kind in ("secret", "config") for o in objects[kind]
            if label_of(o) == stack.name and (kind, o["name"]) not in declared | used]


# ----------------------------------------------------------------------------- the cluster

def _q(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="")


def cluster_services(c: Client) -> list[dict[str, Any]]:
    """Every service with its spec (labels): one `service inspect` per service."""
    out = []
    for s in c.call("GET", "/v1/services"):
        try:
            out.append(c.call("GET", f"/v1/services/{_q(s['id'])}"))
        except CliError:
            continue  # (removed meanwhile)
    return out


def stack_services(c: Client, name: str) -> list[dict[str, Any]]:
    return [s for s in cluster_services(c) if label_of(s) == name]


def _objects(c: Client, kind: str, stack: str = "") -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = c.call("GET", f"/v1/{kind}s")
    if kind == "config":  # (their data, to see whether a redeploy changes one)
        objs = [c.call("GET", f"/v1/configs/{_q(o['id'])}") if label_of(o) == stack else o
                for o in objs]
    return objs


def deploy(c: Client, paths: list[Path], name: str, prune: bool, resolve_image: str,
           out: Any = sys.stdout, err: Any = sys.stderr,
           with_registry_auth: bool = False, no_build: bool = False) -> Plan:
    """``with_registry_auth``: every service's nodes pull its image with the cluster's
    credentials for its registry (`registry login`; docker's flag of the same name).
    The services with ``build:`` are built first on the node ``c`` talks to, once the
    deploy is known to be possible, and run the built image's content tag
    (shoal.cli.compose_build); ``no_build``: the images built before, by their names."""
    import base64

    from shoal.cli.compose import load_stack
    from shoal.raft.models import to_dict

    stack = load_stack(name, paths)
    if with_registry_auth:
        stack.services = [with_auth(spec) for spec in stack.services]
    for w in stack.warnings:
        print(f"Warning: {w}", file=err)
    have = (cluster_services(c), {k: _objects(c, k, name) for k in ("secret", "config")})
    nets = c.call("GET", "/v1/networks") if stack.networks else []
    plan = plan_deploy(stack, have[0], have[1], prune, nets)
    if stack.builds:  # (after the checks above: a deploy refused builds nothing)
        from shoal.cli.compose_build import build_all, with_images

        refs = build_all(c, stack.builds, lambda line: print(line, file=out, flush=True),
                         no_build)
        stack.services = with_images(stack.services, name, refs)
        plan = plan_deploy(stack, have[0], have[1], prune, nets)
    for w in plan.warnings:
        print(f"Warning: {w}", file=err)
    for svc in plan.remove:
        print(f"Removing service {svc}", file=out)
        c.call("DELETE", f"/v1/services/{_q(svc)}")
    for net in plan.networks:
        print(f"Creating network {net.name}", file=out)
        body: dict[str, Any] = {"name": net.name, "driver": "overlay", "labels": net.labels,
                                "internal": net.internal, "attachable": net.attachable}
        if net.subnet:
            body["subnet"] = net.subnet
        c.call("POST", "/v1/networks", body)
    for obj in plan.objects:
        print(f"Creating {obj.kind} {obj.name}", file=out)
        c.call("POST", f"/v1/{obj.kind}s", {"name": obj.name, "labels": obj.labels,
                                            "data": base64.b64encode(obj.data or b"").decode()})
    for spec in plan.create:
        print(f"Creating service {spec.name}", file=out)
        _spec_call(c, "POST", "/v1/services",
                   {"spec": to_dict(spec), "resolve_image": resolve_image})
    for spec, version in plan.update:
        print(f"Updating service {spec.name}", file=out)
        _spec_call(c, "POST", f"/v1/services/{_q(spec.name)}/update",
                   {"spec": to_dict(spec), "version": version, "resolve_image": resolve_image})
    for svc in plan.unchanged:
        print(f"Service {svc} unchanged", file=out)
    for kind, oid, oname in plan.stale:
        try:
            c.call("DELETE", f"/v1/{kind}s/{_q(oid)}")
            print(f"Removing {kind} {oname} (no longer used)", file=out)
        except CliError:  # tasks of the rolling update, or a service's previous spec (its
            # rollback), still use it: a later deploy removes it
            print(f"Keeping {kind} {oname} while tasks or a rollback use it (a later deploy "
                  "removes it)", file=out)
    return plan


def _spec_call(c: Client, method: str, path: str, body: dict[str, Any]) -> Any:
    try:
        return c.call(method, path, body)
    except CliError as exc:
        raise CliError(f"{body['spec']['name']}: {exc} (the stack is partly deployed: fix "
                       "and deploy again)") from None


def remove(c: Client, name: str, out: Any = sys.stdout, net_wait: float = 30.0) -> int:
    """`stack rm`: the stack's services, then its secrets, configs and networks; nothing
    else. A network is removed once the removed services' tasks have let go of it (waits up
    to ``net_wait`` seconds)."""
    found = 0
    for s in sorted(stack_services(c, name), key=lambda s: s["name"]):
        print(f"Removing service {s['name']}", file=out)
        c.call("DELETE", f"/v1/services/{_q(s['id'])}")
        found += 1
    for kind in ("secret", "config"):
        for o in sorted(c.call("GET", f"/v1/{kind}s"), key=lambda o: o["name"]):
            if label_of(o) == name:
                print(f"Removing {kind} {o['name']}", file=out)
                c.call("DELETE", f"/v1/{kind}s/{_q(o['id'])}")
                found += 1
    nets = [n for n in c.call("GET", "/v1/networks") if label_of(n) == name]
    for n in sorted(nets, key=lambda n: n["name"]):
        print(f"Removing network {n['name']}", file=out)
        deadline = time.monotonic() + net_wait
        while True:
            try:
                c.call("DELETE", f"/v1/networks/{_q(n['id'])}")
                break
            except CliError:
                if time.monotonic() > deadline:  # (its tasks are still shutting down)
                    raise
                time.sleep(0.5)
        found += 1
    return found


# ----------------------------------------------------------------------------- CLI

def with_auth(spec: ServiceSpec) -> ServiceSpec:
    """``spec`` with ``task.container.registry_auth`` set (--with-registry-auth)."""
    from msgspec.structs import replace

    task = spec.task
    return replace(spec, task=replace(task, container=replace(task.container,
                                                              registry_auth=True)))


def config_text(paths: list[Path], environ: Mapping[str, str] | None = None,
                interpolation: bool = True) -> str:
    """`stack config`: the files read, merged and (unless not ``interpolation``)
    interpolated as `stack deploy` reads them, as YAML; their warnings on stderr. Not
    translated: a file deploy would refuse for a value is printed too (as docker's)."""
    import yaml

    from shoal.cli.compose import load
    from shoal.cli.compose_env import Dumper

    doc, _, _, warnings = load(paths, environ, interpolation)  # (ComposeError: a CliError)
    for w in warnings:
        print(f"Warning: {w}", file=sys.stderr)

    def escaped(value: Any) -> Any:
        """(an interpolated `$` written `$$` again: the output deploys as its input does)"""
        if isinstance(value, str):
            return value.replace("$", "$$")
        if isinstance(value, dict):
            return {k: escaped(v) for k, v in value.items()}
        if isinstance(value, list):
            return [escaped(v) for v in value]
        return value

    return yaml.dump(escaped(doc) if interpolation else doc, Dumper=Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True)


def add_parser(sub: Any) -> None:
    """`shoal stack ...` under the top-level subparsers ``sub``."""
    st = sub.add_parser("stack", help="deploy applications from Compose files")
    ssub = st.add_subparsers(dest="stack_cmd", required=True, parser_class=type(st))
    d = ssub.add_parser("deploy", help="deploy or update a stack from Compose files")
    d.add_argument("-c", "--compose-file", action="append", required=True, metavar="FILE",
                   dest="compose_files", help="Compose file; repeat to apply override files "
                   "in order (variables from the environment and FILE's directory's .env)")
    d.add_argument("--prune", action="store_true",
                   help="remove the stack's services that the files no longer define")
    d.add_argument("--resolve-image", choices=["always", "changed", "never"],
                   default="always", help="resolve image tags to digests on the manager "
                   "(passed to service create/update)")
    d.add_argument("--with-registry-auth", action="store_true",
                   help="nodes pull the services' images with the credentials of `shoal "
                   "registry login` for their registries")
    d.add_argument("--no-build", action="store_true",
                   help="do not build the services with build:; run the images built "
                   "before on this node under their names (image:, else "
                   "STACK_SERVICE:latest), or image: as written")
    d.add_argument("name", metavar="STACK")
    from shoal.cli import output

    ls = ssub.add_parser("ls", help="list stacks")
    output.add_list_flags(ls, "stack", quiet=False)
    for verb, what, kind in (("ps", "list the tasks of a stack", "task"),
                             ("services", "list the services of a stack", "service")):
        p = ssub.add_parser(verb, help=what)
        p.add_argument("name", metavar="STACK")
        output.add_list_flags(p, kind)
    rm = ssub.add_parser("rm", help="remove stacks: their services, secrets, configs and "
                         "networks")
    rm.add_argument("names", nargs="+", metavar="STACK")
    cf = ssub.add_parser("config", help="print the Compose files merged and interpolated, "
                         "as deploy reads them (docker stack config; no cluster needed)")
    cf.add_argument("-c", "--compose-file", action="append", required=True, metavar="FILE",
                    dest="compose_files", help="Compose file; repeat for override files")
    cf.add_argument("--skip-interpolation", action="store_true",
                    help="leave ${VARIABLES} as written")


def run(c: Client, args: argparse.Namespace, fmt: str) -> None:
    from shoal.cli import output

    cmd = args.stack_cmd
    if cmd == "deploy":
        from pathlib import Path

        deploy(c, [Path(p) for p in args.compose_files], args.name, args.prune,
               args.resolve_image, with_registry_auth=args.with_registry_auth,
               no_build=args.no_build)
    elif cmd == "ls":
        counts: dict[str, int] = {}
        for s in cluster_services(c):
            ns = label_of(s)
            if ns:
                counts[ns] = counts.get(ns, 0) + 1
        rows = [{"name": n, "services": k} for n, k in sorted(counts.items())]
        output.show(rows, args, "stack")
    elif cmd in ("ps", "services"):
        svcs = sorted(stack_services(c, args.name), key=lambda s: s["name"])
        if not svcs:
            raise CliError(f"nothing found in stack: {args.name}")
        recs = [{**{k: v for k, v in s.items()
                    if k not in ("spec", "previous_spec", "health")},
                 "image": s["spec"]["task"]["container"]["image"],
                 "labels": s["spec"].get("labels") or {}} for s in svcs]
        if cmd == "services":
            output.show(recs, args, "stack_service")
        else:
            tasks = [t for s in svcs for t in c.call("GET", f"/v1/services/{_q(s['id'])}/tasks")]
            output.show(tasks, args, "stack_task")
    elif cmd == "config":
        from pathlib import Path

        print(config_text([Path(p) for p in args.compose_files],
                          interpolation=not args.skip_interpolation), end="")
    elif cmd == "rm":
        missing = [n for n in args.names if not remove(c, n)]
        if missing:
            raise CliError(f"nothing found in stack: {', '.join(missing)}")


__all__ = ["STACK_LABEL", "Plan", "add_parser", "deploy", "plan_deploy", "remove", "run"]
