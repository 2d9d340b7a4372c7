"""`shoal registry login/logout`, `shoal image pull/tag/push/prune`, the image GC flags of `shoal
agent`, and the registry flags of `service
create/update` (``--with-registry-auth``, ``--resolve-image``).

Owns: these commands' arguments and output. The password is read from stdin
(``--password-stdin``) or a prompt without echo, sent once to the manager (which checks it
against the registry and keeps it sealed), and never printed. Must not touch: other command
groups (cli/main.py hooks these in with a few lines).
"""

from __future__ import annotations

import argparse
import json
import sys

from shoal.cli.errors import CliError

TYPE_CHECKING = False  # (typing's, without importing typing: `service ls` builds our flags)
if TYPE_CHECKING:  # (imported where used: `shoal service ...` imports this module)
    from typing import Any, Protocol

    from shoal.runtime.images import ImageGCConfig

    class _Client(Protocol):
        timeout: float

        def call(self, method: str, path: str, body: Any = None) -> Any: ...

TRANSFER_TIMEOUT = 3600.0  # seconds the CLI waits for a pull's or push's answer (at the end)


def add_parser(sub: Any) -> None:
    r = sub.add_parser("registry", help="credentials for image registries")
    rsub = r.add_subparsers(dest="registry_cmd", required=True, parser_class=type(r))
    li = rsub.add_parser("login", help="check and keep credentials for a registry (sealed "
                         "in the cluster; services use them with --with-registry-auth)")
    li.add_argument("server", metavar="HOST[:PORT]")
    li.add_argument("-u", "--username", default="")
    li.add_argument("--password-stdin", action="store_true",
                    help="read the password from stdin (else: prompt without echo)")
    lo = rsub.add_parser("logout", help="forget a registry's credentials")
    lo.add_argument("server", metavar="HOST[:PORT]")


def add_image_pull(isub: Any) -> None:
    ip = isub.add_parser("pull", help="pull an image from its registry into this node "
                         "(layers from peers first)")
    ip.add_argument("ref", metavar="HOST[:PORT]/NAME[:TAG][@DIGEST]")


def add_image_tag_push(isub: Any) -> None:
    it = isub.add_parser("tag", help="give an image of this node another name (docker's "
                         "image tag): HOST[:PORT]/NAME[:TAG] to push it there")
    it.add_argument("source", metavar="SOURCE", help="NAME[:TAG], an id or an id prefix")
    it.add_argument("target", metavar="TARGET", help="[HOST[:PORT]/]NAME[:TAG]")
    ip = isub.add_parser("push", help="push an image of this node to its registry (with the "
                         "cluster's credentials: push from a manager)")
    ip.add_argument("ref", metavar="HOST[:PORT]/NAME[:TAG]")


def add_image_save(isub: Any) -> None:
    sp = isub.add_parser("save", help="write images of this node to a tar archive (docker "
                         "save: an OCI image layout with docker's manifest.json)")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout, "
                    "which must not be a terminal)")
    sp.add_argument("refs", nargs="+", metavar="IMAGE", help="NAME:TAG, NAME (every tag "
                    "of the repository, as docker save), an id or an id prefix")


def run_save(c: Any, args: argparse.Namespace) -> None:
    """docker save: the archive to -o FILE (removed again if the agent fails midway) or to
    stdout."""
    import os
    import stat

    c.timeout = max(c.timeout, TRANSFER_TIMEOUT)
    if not args.output:
        if sys.stdout.isatty():
            raise CliError("refusing to write an archive to a terminal: give -o FILE or "
                           "redirect stdout")
        c.download("/v1/images/save", {"refs": args.refs}, sys.stdout.buffer)
        return
    target = os.path.realpath(args.output)  # (a symbolic link: its target is written)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}", "output") from None
    if not stat.S_ISREG(mode):  # (a directory, a device, a FIFO: never replaced)
        raise CliError(f"{args.output} is not a regular file: give a file's path (or "
                       "redirect stdout)", "output")
    part = f"{target}.part"  # (renamed over the file once the archive is whole)
    try:
        with open(part, "wb") as out:
            c.download("/v1/images/save", {"refs": args.refs}, out)
        os.replace(part, target)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}", "output") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)


def run_tag(c: _Client, args: argparse.Namespace) -> None:
    c.call("POST", "/v1/images/tag", {"source": args.source, "target": args.target})


def run_push(c: _Client, args: argparse.Namespace, fmt: str) -> None:
    """docker push's lines: one per blob (pushed, or already there), then the digest."""
    c.timeout = max(c.timeout, TRANSFER_TIMEOUT)  # (the agent answers once it is done)
    done = c.call("POST", "/v1/images/push", {"ref": args.ref})
    if fmt == "json":
        print(json.dumps(done, indent=2))
        return
    print(f"The push refers to repository [{done['ref'].rsplit(':', 1)[0]}]")
    for blob in done["blobs"]:
        state = "Pushed" if blob["status"] == "pushed" else "Layer already exists"
        print(f"{blob['digest'].removeprefix('sha256:')[:12]}: {state}")
    tag = done["ref"].rsplit(":", 1)[-1] if ":" in done["ref"].rsplit("/", 1)[-1] else "latest"
    print(f"{tag}: digest: {done['digest']} size: {done['size']}")


def add_image_prune(isub: Any) -> None:
    ip = isub.add_parser("prune", help="remove images no task on this node uses (only the "
                         "ones without a name:tag unless -a)")
    ip.add_argument("-a", "--all", action="store_true",
                    help="every unused image, not only the ones without a name:tag")
    ip.add_argument("--filter", action="append", default=[], metavar="until=DURATION",
                    help="only images unused for at least DURATION (e.g. until=24h)")


def add_agent_flags(a: Any) -> None:
    """`shoal agent` flags of the image garbage collection (ImageGCConfig)."""
    from shoal.runtime.images import ImageGCConfig

    d = ImageGCConfig()
    a.add_argument("--image-gc-high-threshold", type=float, default=d.high_percent,
                   metavar="PERCENT", help="remove unused images, least recently used first, "
                   "when the image store's filesystem is this full (default "
                   f"{d.high_percent:g}; 100: never for space)")
    a.add_argument("--image-gc-low-threshold", type=float, default=d.low_percent,
                   metavar="PERCENT", help="... until it is below this (default "
                   f"{d.low_percent:g})")
    a.add_argument("--image-gc-max-age", default="0", metavar="DURATION",
                   help="also remove images unused for this long (e.g. 7d... as 168h; "
                   "default 0: never for age)")
    a.add_argument("--image-gc-interval", default=f"{d.interval:g}s", metavar="DURATION",
                   help=f"time between two collections (default {d.interval:g}s; 0: off)")
    a.add_argument("--builder-gc-keep-storage", default="auto", metavar="SIZE",
                   help="at each collection, prune the build cache (`builder prune`'s) down to "
                   "this size, least recently used first (default auto: 10%% of the disk, "
                   "as BuildKit's; 0: no bound)")


def image_gc_config(args: argparse.Namespace) -> ImageGCConfig:
    from shoal.cli.flagvalues import parse_duration, parse_size
    from shoal.runtime.images import ImageGCConfig

    keep = args.builder_gc_keep_storage.strip()
    return ImageGCConfig(build_cache_keep=-1 if keep == "auto" else
                         parse_size(keep, "--builder-gc-keep-storage"),
                         high_percent=args.image_gc_high_threshold,
                         low_percent=args.image_gc_low_threshold,
                         max_age=parse_duration(args.image_gc_max_age, "--image-gc-max-age"),
                         interval=parse_duration(args.image_gc_interval,
                                                 "--image-gc-interval"))


def add_service_flags(parser: argparse.ArgumentParser, update: bool) -> None:
    parser.add_argument("--with-registry-auth", action="store_true", default=None,
                        help="nodes pull the image with the credentials of `shoal registry "
                        "login` for its registry")
    parser.add_argument("--resolve-image", choices=["always", "changed", "never"],
                        default=None, help="pin the image tag to the registry's digest "
                        f"(default: {'changed' if update else 'always'})")


def service_body(body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A create/update request body with the registry flags applied."""
    if getattr(args, "with_registry_auth", None):
        body["spec"].setdefault("task", {}).setdefault("container", {})["registry_auth"] = True
    if getattr(args, "resolve_image", None):
        body["resolve_image"] = args.resolve_image
    return body


def print_warnings(reply: Any) -> None:
    for w in (reply.get("warnings") or []) if isinstance(reply, dict) else []:
        print(f"warning: {w}", file=sys.stderr)


def run(c: _Client, args: argparse.Namespace, fmt: str) -> None:
    if args.registry_cmd == "login":
        user = args.username or input("Username: ").strip()
        if args.password_stdin:
            password = sys.stdin.read().rstrip("\r\n")
        else:
            import getpass

            password = getpass.getpass("Password: ")
        if not user or not password:
            raise CliError("a username and a password are required")
        r = c.call("POST", "/v1/registry/login",
                   {"server": args.server, "username": user, "password": password})
        print(f"Login Succeeded: credentials for {r['server']} stored in the cluster")
    elif args.registry_cmd == "logout":
        import urllib.parse

        r = c.call("DELETE", f"/v1/registry/login/{urllib.parse.quote(args.server, safe='')}")
        print(f"Removed the credentials for {r['server']}")


def run_pull(c: _Client, args: argparse.Namespace, fmt: str, period: float = 0.5) -> None:
    """POST the pull and, while it runs, show its progress (GET /v1/images/pulls): one
    rewritten line on a terminal, a plain line per change otherwise."""
    result: dict[str, Any] = {}
    c.timeout = max(c.timeout, TRANSFER_TIMEOUT)  # (the answer comes when the pull is done)

    def pull() -> None:
        try:
            result["img"] = c.call("POST", "/v1/images/pull", {"ref": args.ref})
        except CliError as exc:
            result["err"] = exc

    import threading

    worker = threading.Thread(target=pull, daemon=True)
    worker.start()
    tty = sys.stdout.isatty()
    last = ""
    while True:
        worker.join(period)
        if not worker.is_alive():
            break
        try:
            pulls = c.call("GET", "/v1/images/pulls")
        except CliError:
            continue
        msg = next((str(p.get("message", "")) for p in pulls or []
                    if p.get("ref") == args.ref), "")
        if msg and msg != last:
            last = msg
            print(f"\r\033[K{msg}" if tty else msg, end="" if tty else "\n", flush=True)
    if tty and last:
        print("\r\033[K", end="")
    if "err" in result:
        raise result["err"]
    img = result["img"]
    print(f"Pulled {args.ref} ({img['id'][:19]})")


def run_prune(c: _Client, args: argparse.Namespace, fmt: str) -> None:
    from shoal.cli.flagvalues import parse_duration

    body: dict[str, Any] = {"all": bool(args.all)}
    for f in args.filter:
        key, sep, value = f.partition("=")
        if key != "until" or not sep:
            raise CliError(f"--filter {f!r}: only until=DURATION is supported")
        body["until"] = parse_duration(value, "--filter until")
    r = c.call("POST", "/v1/images/prune", body)
    for image_id in r["deleted"]:
        print(f"Deleted: {image_id}")
    print(f"Total reclaimed space: {r['reclaimed'] / 1e6:.1f} MB")


__all__ = [
    "add_agent_flags",
    "add_image_prune",
    "add_image_pull",
    "add_parser",
    "add_service_flags",
    "image_gc_config",
    "print_warnings",
    "run",
    "run_prune",
    "run_pull",
    "service_body",
]
