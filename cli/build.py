"""``shoal image build``: send a build context to this node's agent and show the build.

Owns: the ``image build`` sub-command's flags, packing the context as a tar (honouring
.dockerignore, as `docker build` does, so ignored files are never sent) and printing the
streamed build records — ``build_image``, which `shoal stack deploy` uses as well
(shoal.cli.compose_build). Must not touch: the build itself (the agent runs it:
shoal.runtime.build behind ``POST /v1/images/build``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, cast

from shoal.cli.client import Client
from shoal.cli.errors import CliError

# (tarfile, tempfile and shoal.runtime.build are imported when a build runs: every `shoal`
# command pays for what this module imports at the top)
NETWORKS = ("default", "none", "host")  # RUN's network modes (shoal.runtime.buildnet's)


def add_parser(isub: Any) -> None:
    """``image build`` under the ``image`` sub-parsers."""
    p = isub.add_parser("build", help="build an image from a Dockerfile")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME:TAG",
                   help="name the image (repeatable)")
    p.add_argument("-f", "--file", default="", help="the Dockerfile (default CONTEXT/Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                   help="a value for an ARG (repeatable)")
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="a label of the image (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="do not use the layer cache")
    p.add_argument("--network", choices=NETWORKS, default="default",
                   help="RUN's network: default (the node's task network: an address of its "
                   "own, outbound NAT, the node's DNS), none (only lo), host (the node's)")
    p.add_argument("--secret", action="append", default=[],
                   metavar="id=ID[,src=FILE|env=VAR]",
                   help="a secret for RUN --mount=type=secret (repeatable; Docker's forms: "
                   "src=/source= a file, env= a variable of this shell, type=file|env; id "
                   "alone: the variable ID, else the file ID). Sent in the build request, "
                   "never stored; changing it does not rebuild a cached step")
    p.add_argument("--target", default="", metavar="STAGE",
                   help="build up to this stage of a multi-stage Dockerfile (default: the last)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="json: only the final record (image id, cache hits, new layers)")
    p.add_argument("context", help="the build context directory")


def pack_context(context: str, dockerfile: str) -> tuple[BinaryIO, str]:
    """(a temporary tar of the context, read from its start; the Dockerfile's path inside
    it). The file has no name (``tempfile.TemporaryFile``): nothing of it is left in /tmp,
    even when the CLI is killed mid-build. A Dockerfile outside the context is added to the
    tar under a reserved name. The caller closes the file."""
    import tarfile
    import tempfile

    from shoal.runtime.dockerfile import context_files

    if not os.path.isdir(context):
        raise CliError(f"the build context {context} is not a directory")
    ctx = os.path.abspath(context)
    df = os.path.abspath(dockerfile) if dockerfile else os.path.join(ctx, "Dockerfile")
    if not os.path.isfile(df):
        raise CliError(f"no Dockerfile at {df}")
    # (returned open: the caller closes it)
    body = tempfile.TemporaryFile(prefix="shoal-build-", suffix=".tar")  # noqa: SIM115
    rel_df = os.path.relpath(df, ctx)
    try:
        with tarfile.open(fileobj=body, mode="w", format=tarfile.PAX_FORMAT) as tar:
            link = os.path.islink(df)  # (sent as the file it names: the agent reads no link)
            for rel in context_files(ctx):  # (sorted: directories before what they hold)
                if not (link and rel == rel_df):
                    tar.add(os.path.join(ctx, rel), arcname=rel, recursive=False)
            if rel_df.startswith(".."):
                rel_df = ".shoal-dockerfile"
                tar.add(os.path.realpath(df), arcname=rel_df)
            elif link or rel_df not in context_files(ctx):  # (or excluded by .dockerignore)
                tar.add(os.path.realpath(df), arcname=rel_df)
        body.seek(0)
    except BaseException:
        body.close()
        raise
    return body, rel_df


def parse_secret(spec: str, environ: Mapping[str, str] | None = None) -> tuple[str, bytes]:
    """``--secret``'s value (docker buildx's: ``id=``, ``src=``/``source=`` a file, ``env=``
    a variable, ``type=file|env`` — with ``type=env`` a ``src=`` names the variable; only an
    id: the variable of that name when set, else the file) as (id, its bytes). CliError
    naming ``secret`` (and never quoting the value) for a bad form, an unreadable file, an
    unset variable, more than MAX_SECRET bytes."""
    from shoal.runtime.buildmounts import MAX_SECRET
    from shoal.runtime.dockerfile import SECRET_ID

    env = os.environ if environ is None else environ
    fields: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, text = item.strip().partition("=")
        key = {"source": "src"}.get(key.lower(), key.lower())
        if not sep or key not in ("id", "src", "env", "type"):  # (the item is not quoted:
            # it may be a value typed in the wrong place)
            raise CliError("--secret: expected id=ID[,src=FILE|env=VAR][,type=file|env]"
                           + (f" (no option {key!r})" if sep else " (an item without '=')"),
                           "secret")
        fields[key] = text
    kind, sid = fields.get("type", ""), fields.get("id", "")
    if kind not in ("", "file", "env"):
        raise CliError(f"--secret: type={kind} is not file or env", "secret")
    src, var = fields.get("src", ""), fields.get("env", "")
    if kind == "env" and src and not var:
        src, var = "", src
    sid = sid or var or os.path.basename(src)
    if not SECRET_ID.fullmatch(sid):
        raise CliError(f"--secret: id {sid!r} is not a secret id (letters, digits, '_', '.', "
                       "'-'; at most 128)" if sid else "--secret needs id=ID", "secret")
    if src and var:
        raise CliError(f"--secret id={sid}: give src= or env=, not both", "secret")
    if not src and not var:  # (buildx's: the variable ID, else the file ID)
        if kind != "file" and sid in env:
            var = sid
        else:
            src = sid
    if var:
        if var not in env:
            raise CliError(f"--secret id={sid}: the environment variable {var} is not set",
                           "secret")
        value = env[var].encode()
    else:
        try:
            with open(src, "rb") as fh:
                value = fh.read(MAX_SECRET + 1)
        except OSError as exc:
            raise CliError(f"--secret id={sid}: cannot read {src}: {exc.strerror}",
                           "secret") from None
    if len(value) > MAX_SECRET:
        raise CliError(f"--secret id={sid}: more than {MAX_SECRET} bytes (500 KiB, "
                       "BuildKit's limit)", "secret")
    return sid, value


def read_secrets(specs: Sequence[str]) -> dict[str, bytes]:
    """Every ``--secret`` (a later one of an id wins, as buildx's)."""
    return dict(parse_secret(s) for s in specs)


def run(c: Client, args: argparse.Namespace, fmt: str) -> None:
    show = None if args.quiet or fmt == "json" else _print
    final = build_image(c, args.context, args.file, tags=args.tag,
                        build_args=args.build_arg, labels=args.label,
                        no_cache=args.no_cache, network=args.network, target=args.target,
                        secrets=read_secrets(args.secret), show=show)
    if fmt == "json":
        print(json.dumps(final))
    elif args.quiet:
        print(final["image"])
    else:
        print(summary(final))


def summary(final: dict[str, Any]) -> str:
    """The last line of a build: what the cache saved."""
    return (f"{final['cached']}/{final['steps']} steps from the cache, "
            f"{final['layers_created']} new layers")


def build_image(c: Client, context: str, dockerfile: str = "", *,
                tags: Sequence[str] = (), build_args: Sequence[str] = (),
                labels: Sequence[str] = (), no_cache: bool = False, network: str = "",
                target: str = "", secrets: Mapping[str, bytes] | None = None,
                show: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Build ``context`` on the agent ``c`` talks to: the final record (``image`` id,
    ``tags``, ``steps``, ``cached``, ``layers_created``...); ``show`` gets each output line
    as it comes. ``build_args``/``labels``: ``K=V``; ``network``: RUN's network mode ("": the
    agent's default, ``default``); ``target``: the stage to build ("" the last);
    ``secrets``: id -> bytes, sent ahead of the tar in the request's body. CliError
    ("build failed: ...") when the builder fails. (Also `shoal stack deploy`'s,
    shoal.cli.compose_build.)"""
    from urllib.parse import urlencode

    if secrets:
        _check_takes_secrets(c)
    body, rel_df = pack_context(context, dockerfile)
    query: list[tuple[str, str]] = [("t", t) for t in tags]
    query += [("dockerfile", rel_df)] + [("buildarg", a) for a in build_args]
    query += [("label", a) for a in labels]
    if no_cache:
        query.append(("nocache", "1"))
    if network:
        query.append(("network", network))
    if target:
        query.append(("target", target))
    try:
        final: dict[str, Any] = {}
        for rec in _post_stream(c, "/v1/images/build?" + urlencode(query), body,
                                secrets or {}):
            if "stream" in rec and show is not None:
                show(rec["stream"])
            elif "error" in rec:
                raise CliError(f"build failed: {rec['error']}")
            elif "image" in rec:
                final = rec
        if not final:
            raise CliError("the agent ended the build without a result")
        return final
    finally:
        body.close()


def _check_takes_secrets(c: Client) -> None:
    """CliError, before anything is sent, when the agent predates build secrets: it would
    take the secrets part for the start of the context's tar and write it to its disk."""
    info = c.call("GET", "/v1/info")
    if "build-secrets" not in ((info.get("features") if isinstance(info, dict) else None)
                               or []):
        raise CliError("--secret: the agent at this address does not take build secrets (an "
                       "older shoal): nothing was sent; upgrade it, or build without "
                       "secrets", "secret")


def _print(line: str) -> None:
    print(line, flush=True)


class _Body:
    """The request body: the secrets part (in memory), then the tar file."""

    def __init__(self, head: bytes, tar: BinaryIO) -> None:
        self.head, self.tar = head, tar

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out, self.head = self.head + self.tar.read(), b""
            return out
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.tar.read(n)


def _post_stream(c: Client, path: str, body: BinaryIO, secrets: Mapping[str, bytes]
                 ) -> Iterator[dict[str, Any]]:
    """POST the secrets part (``X-Shoal-Build-Secrets``: its length; JSON of base64) and the
    tar, and yield the JSON-lines records as they arrive."""
    import base64

    head = json.dumps({k: base64.b64encode(v).decode() for k, v in secrets.items()}
                      ).encode() if secrets else b""
    headers = {"Content-Type": "application/x-tar",
               "Content-Length": str(len(head) + os.fstat(body.fileno()).st_size)}
    if head:
        headers["X-Shoal-Build-Secrets"] = str(len(head))
    yield from c.stream(path, "POST", cast(BinaryIO, _Body(head, body)), headers)
