"""``shoal image build``: send a build context to this node's agent and show the build.

Owns: the ``image build`` sub-command's flags, packing the context as a tar (honouring
.dockerignore, as `docker build` does, so ignored files are never sent) and printing the
streamed build records. Must not touch: the build itself (the agent runs it:
shoal.runtime.build behind ``POST /v1/images/build``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

from shoal.cli.client import Client
from shoal.cli.errors import CliError

# (tarfile, tempfile and shoal.runtime.build are imported when a build runs: every `shoal`
# command pays for what this module imports at the top)


def add_parser(isub: Any) -> None:
    """``image build`` under the ``image`` sub-parsers."""
    p = isub.add_parser("build", help="build an image from a Dockerfile")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME:TAG",
                   help="name the image (repeatable)")
    p.add_argument("-f", "--file", default="", help="the Dockerfile (default CONTEXT/Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                   help="a value for an ARG (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="do not use the layer cache")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="json: only the final record (image id, cache hits, new layers)")
    p.add_argument("context", help="the build context directory")


def pack_context(context: str, dockerfile: str) -> tuple[str, str]:
    """(path of a temporary tar of the context, the Dockerfile's path inside it). A
    Dockerfile outside the context is added to the tar under a reserved name."""
    import tarfile
    import tempfile

    from shoal.runtime.dockerfile import context_files

    if not os.path.isdir(context):
        raise CliError(f"the build context {context} is not a directory")
    ctx = os.path.abspath(context)
    df = os.path.abspath(dockerfile) if dockerfile else os.path.join(ctx, "Dockerfile")
    if not os.path.isfile(df):
        raise CliError(f"no Dockerfile at {df}")
    fd, tmp = tempfile.mkstemp(prefix="shoal-build-", suffix=".tar")
    os.close(fd)
    rel_df = os.path.relpath(df, ctx)
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in context_files(ctx):  # (sorted: directories before what they hold)
            tar.add(os.path.join(ctx, rel), arcname=rel, recursive=False)
        if rel_df.startswith(".."):
            rel_df = ".shoal-dockerfile"
            tar.add(df, arcname=rel_df)
        elif rel_df not in context_files(ctx):  # excluded by .dockerignore: still sent
            tar.add(df, arcname=rel_df)
    return tmp, rel_df


def run(c: Client, args: argparse.Namespace, fmt: str) -> None:
    from urllib.parse import urlencode

    tarpath, rel_df = pack_context(args.context, args.file)
    query: list[tuple[str, str]] = [("t", t) for t in args.tag]
    query += [("dockerfile", rel_df)] + [("buildarg", a) for a in args.build_arg]
    if args.no_cache:
        query.append(("nocache", "1"))
    try:
        final: dict[str, Any] = {}
        for rec in _post_stream(c, "/v1/images/build?" + urlencode(query), tarpath):
            if "stream" in rec and not args.quiet and fmt != "json":
                print(rec["stream"], flush=True)
            elif "error" in rec:
                raise CliError(f"build failed: {rec['error']}")
            elif "image" in rec:
                final = rec
        if not final:
            raise CliError("the agent ended the build without a result")
        if fmt == "json":
            print(json.dumps(final))
        elif args.quiet:
            print(final["image"])
        else:
            print(f"{final['cached']}/{final['steps']} steps from the cache, "
                  f"{final['layers_created']} new layers")
    finally:
        os.unlink(tarpath)


def _post_stream(c: Client, path: str, tarpath: str) -> Iterator[dict[str, Any]]:
    """POST the tar and yield the JSON-lines records as they arrive."""
    with open(tarpath, "rb") as body:
        yield from c.stream(path, "POST", body, {
            "Content-Type": "application/x-tar",
            "Content-Length": str(os.path.getsize(tarpath))})
