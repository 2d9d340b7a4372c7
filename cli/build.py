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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

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


def run(c: Client, args: argparse.Namespace, fmt: str) -> None:
    show = None if args.quiet or fmt == "json" else _print
    final = build_image(c, args.context, args.file, tags=args.tag,
                        build_args=args.build_arg, labels=args.label,
                        no_cache=args.no_cache, network=args.network, target=args.target,
                        show=show)
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
                target: str = "", show: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Build ``context`` on the agent ``c`` talks to: the final record (``image`` id,
    ``tags``, ``steps``, ``cached``, ``layers_created``...); ``show`` gets each output line
    as it comes. ``build_args``/``labels``: ``K=V``; ``network``: RUN's network mode ("": the
    agent's default, ``default``); ``target``: the stage to build ("" the last). CliError
    ("build failed: ...") when the builder fails. (Also `shoal stack deploy`'s,
    shoal.cli.compose_build.)"""
    from urllib.parse import urlencode

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
        for rec in _post_stream(c, "/v1/images/build?" + urlencode(query), body):
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


def _print(line: str) -> None:
    print(line, flush=True)


def _post_stream(c: Client, path: str, body: BinaryIO) -> Iterator[dict[str, Any]]:
    """POST the tar and yield the JSON-lines records as they arrive."""
    yield from c.stream(path, "POST", body, {
        "Content-Type": "application/x-tar",
        "Content-Length": str(os.fstat(body.fileno()).st_size)})
