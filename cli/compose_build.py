"""A Compose service's ``build:``: what `shoal stack deploy` builds, and the image it deploys.

Owns: reading ``services.X.build`` (a context path, or the long form: ``context``,
``dockerfile``, ``dockerfile_inline``, ``args``, ``labels``, ``tags``, ``no_cache``,
``network``: ``default``, ``none`` or ``host``, as `image build --network`; ``target``;
``secrets``: top-level secrets, by key or ``{source, target}``, as `image build --secret`;
the keys shoal's builder cannot apply are warned about by name, or refused where ignoring
them would build another image), running the builds through the agent's
``POST /v1/images/build`` (shoal.cli.build.build_image, as `shoal image build`) and naming
each result by its content.
Must not touch: the rest of the translation (shoal.cli.compose), the cluster's services
(shoal.cli.stack plans and writes them), the builder (the agent runs it).

Beyond `docker stack deploy` (which ignores ``build:``) and like `docker compose up`: the
image is built on the node the CLI talks to, tagged with its name — ``image:`` when the
service gives one (as docker compose), else ``STACK_SERVICE:latest`` — and with a
*content* tag ``STACK_SERVICE:HEX``, HEX the first 12 hex digits of the image id. The
service runs the content tag: every node runs the same bytes (a node that lacks the tag
fetches it from the peer that built it, shoal.node.transfer; one holding an older image
under a moving tag would keep running that), a rebuild that changes the image is a new
reference and rolls the service per its update config, and an unchanged rebuild (the layer
cache gives the same id) is the same reference: nothing redeploys. The content tag names
no registry, so the managers' ``--resolve-image`` leaves it alone. With ``build.target`` the
result is that stage's image, so the tag is of what was built: another target is another
image id, another tag, and the service rolls to it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.cli.build import NETWORKS
from shoal.cli.compose_env import _as_map
from shoal.cli.compose_keys import (
    FileObject,
    _Warnings,
    as_bool,
    as_labels,
    as_map,
    as_str,
    as_str_list,
)
from shoal.cli.errors import CliError, ComposeError

# hex digits of the image id in the content tag (STACK_SERVICE:HEX), as `image ls` shows ids
CONTENT_TAG_LEN = 12
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")  # (runtime/reference.py)
# build keys shoal's builder does not apply; the deploy goes on without them
_NOT_APPLIED = {
    "cache_from": "the layer cache is the building node's own",
    "cache_to": "the layer cache is the building node's own",
    "pull": "FROM uses the node's image when it has one, else pulls it",
    "extra_hosts": "RUN's /etc/hosts gets no lines from the build in shoal's builder",
    "shm_size": "RUN gets the runtime's default /dev/shm",
    "ulimits": "RUN gets the runtime's default limits",
    "isolation": "RUN runs in the runtime's namespaces",
    "privileged": "RUN is never privileged in shoal's builder",
    "entitlements": "RUN is never privileged in shoal's builder",
    "platforms": "the image is built for the building node's platform",
    "ssh": "RUN --mount=type=ssh is not supported by shoal's builder (cache, bind, tmpfs "
           "are): a step that needs the agent fails",
}
# build keys whose absence would build another image than the file asks for
_REFUSED = {
    "additional_contexts": "shoal's builder has no named contexts (COPY --from takes a "
                           "stage or an image)",
}


@dataclass(frozen=True)
class BuildSpec:
    """One service's build, read from its ``build:``."""

    key: str  # the service's key under services:
    path: str  # "services.KEY.build"
    repo: str  # STACK_KEY, lower case: the content tag's name
    name: str  # the tag it is built under: the service's image:, else REPO:latest
    context: Path
    dockerfile: Path | None = None  # None: CONTEXT/Dockerfile
    dockerfile_inline: str | None = None
    args: tuple[str, ...] = ()  # K=V
    labels: tuple[str, ...] = ()  # K=V
    tags: tuple[str, ...] = ()  # more names (build.tags)
    no_cache: bool = False
    network: str = ""  # RUN's network mode ("": the builder's default)
    target: str = ""  # the stage to build (build.target; "": the Dockerfile's last)
    image_given: bool = False  # the service gives image: (which is ``name``)
    # build.secrets: (id in the Dockerfile, its bytes) — `image build --secret`'s; never in a
    # repr (a traceback, a log line)
    secrets: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    secret_sources: tuple[str, ...] = ()  # the top-level secrets they come from

    def content_ref(self, image_id: str) -> str:
        """The reference the service runs: REPO:HEX of the image id."""
        return f"{self.repo}:{image_id.removeprefix('sha256:')[:CONTENT_TAG_LEN]}"


def read_build(stack: str, key: str, body: Mapping[str, Any], project_dir: Path,
               env: Mapping[str, str], w: _Warnings,
               secrets: Mapping[str, FileObject] | None = None) -> BuildSpec:
    """``services.KEY.build`` → BuildSpec, or a ComposeError naming the field; ``secrets``:
    the file's top-level ``secrets:`` (what ``build.secrets`` names)."""
    path = f"services.{key}.build"
    repo = f"{stack}_{key}".lower()
    if not _COMPONENT.fullmatch(repo):
        raise ComposeError(path, f"the built image would be named {repo!r}, which is not an "
                           "image name: rename the service (letters, digits, and ., _, - "
                           "between them)")
    image = body.get("image")
    name = as_str(image, f"services.{key}.image") if image is not None else f"{repo}:latest"
    if "@" in name:
        raise ComposeError(f"services.{key}.image", "a built image is tagged with image:, "
                           "and a digest cannot be a tag: give NAME[:TAG]")
    raw = body["build"]
    spec: dict[str, Any] = {"context": raw} if isinstance(raw, str) else \
        dict(as_map(raw, path))
    context = as_str(spec.pop("context", "."), f"{path}.context")
    if re.match(r"^([a-z][a-z0-9+.-]*://|git@|github\.com/)", context):
        raise ComposeError(f"{path}.context", f"a remote context ({context}) is not "
                           "supported: clone it and give its directory")
    ctx = (project_dir / context).resolve()  # (checked on disk when built: check_paths)
    dockerfile: Path | None = None
    if "dockerfile" in spec:
        dockerfile = ctx / as_str(spec.pop("dockerfile"), f"{path}.dockerfile")
    inline = None
    if "dockerfile_inline" in spec:
        inline = as_str(spec.pop("dockerfile_inline"), f"{path}.dockerfile_inline")
        if dockerfile is not None:
            raise ComposeError(f"{path}.dockerfile_inline", "dockerfile and "
                               "dockerfile_inline cannot both be given")
    args = []
    for k, v in as_map(_as_map(spec.pop("args", None) or {}), f"{path}.args").items():
        if not re.fullmatch(r"\w+", k):
            raise ComposeError(f"{path}.args.{k}", "not a build argument name")
        if v is None:  # (a name alone: its value from the environment, unset: the ARG's)
            if k in env:
                args.append(f"{k}={env[k]}")
            continue
        value = ("true" if v else "false") if isinstance(v, bool) else \
            as_str(v, f"{path}.args.{k}")
        args.append(f"{k}={value}")
    labels = [f"{k}={v}" for k, v in
              as_labels(spec.pop("labels", None) or {}, f"{path}.labels").items()]
    tags = as_str_list(spec.pop("tags", None) or [], f"{path}.tags")
    no_cache = as_bool(spec.pop("no_cache", False), f"{path}.no_cache")
    network = ""
    if "network" in spec:
        network = as_str(spec.pop("network"), f"{path}.network")
        if network not in NETWORKS:
            raise ComposeError(f"{path}.network", f"{network!r} is not a network shoal's "
                               "builder can give RUN: default, none or host (no user-defined "
                               "networks)")
    target = as_str(spec.pop("target", None) or "", f"{path}.target")
    if target and not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", target):
        raise ComposeError(f"{path}.target", f"{target!r} is not a stage name (a letter, "
                           "then letters, digits, '.', '_' or '-')")
    build_secrets, sources = _build_secrets(spec.pop("secrets", None) or [],
                                            f"{path}.secrets", secrets or {}, key, w)
    for k in list(spec):
        if k in _REFUSED:
            raise ComposeError(f"{path}.{k}", f"not supported: {_REFUSED[k]}")
        if k in _NOT_APPLIED:
            w.add(f"build.{k}", f"not applied: {_NOT_APPLIED[k]}", key)
        elif not k.startswith("x-"):
            raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                               "Specification's build)")
    return BuildSpec(key=key, path=path, repo=repo, name=name, context=ctx,
                     dockerfile=dockerfile, dockerfile_inline=inline, args=tuple(args),
                     labels=tuple(labels), tags=tuple(tags), no_cache=no_cache,
                     network=network, target=target, image_given=image is not None,
                     secrets=build_secrets, secret_sources=sources)


def _build_secrets(raw: Any, path: str, secrets: Mapping[str, FileObject], key: str,
                   w: _Warnings) -> tuple[tuple[tuple[str, bytes], ...], tuple[str, ...]]:
    """``build.secrets`` (the Compose Specification's: a top-level secret's key, or
    ``{source, target}`` — ``target`` the id the Dockerfile's ``RUN --mount=type=secret``
    uses, default the source) → ((id, bytes)..., the sources), as `image build --secret
    id=TARGET,src=...`.
    ``uid``/``gid``/``mode`` are the RUN's ``--mount`` options in a build: warned, not
    applied. An external secret's bytes are the cluster's, not the CLI's: refused."""
    from shoal.runtime.dockerfile import SECRET_ID

    if not isinstance(raw, list):
        raise ComposeError(path, "must be a list of secret names or {source, target}")
    out: dict[str, bytes] = {}
    sources: list[str] = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if isinstance(item, str):
            source, target = item, item
        else:
            m = as_map(item, where)
            for k in m:
                if k in ("uid", "gid", "mode"):
                    w.add(f"build.secrets.{k}", "not applied: a build secret's owner and mode "
                          "are its RUN --mount=type=secret's uid=, gid=, mode=", key)
                elif k not in ("source", "target") and not k.startswith("x-"):
                    raise ComposeError(f"{where}.{k}", "unknown key (a build secret takes "
                                       "source, target, uid, gid, mode)")
            source = as_str(m.get("source"), f"{where}.source")
            target = as_str(m.get("target") or source, f"{where}.target")
        obj = secrets.get(source)
        if obj is None:
            raise ComposeError(where, f"no secret {source!r} in the file's top-level secrets:")
        if obj.data is None:
            raise ComposeError(where, f"secret {source!r} is external: its content is the "
                               "cluster's, and a build needs it from the file (file: or "
                               "environment:)")
        if not SECRET_ID.fullmatch(target):
            raise ComposeError(f"{where}.target", f"{target!r} is not a secret id (letters, "
                               "digits, '_', '.', '-')")
        from shoal.runtime.buildmounts import MAX_SECRET

        if len(obj.data) > MAX_SECRET:
            raise ComposeError(where, f"secret {source!r} is more than {MAX_SECRET} bytes "
                               "(500 KiB, BuildKit's limit for a build secret)")
        out[target] = obj.data
        sources.append(source)
    return tuple(out.items()), tuple(sources)


def check_paths(b: BuildSpec) -> None:
    """The context and Dockerfile are there (before any build: a typo in the last service
    stops the deploy before the first build)."""
    if not b.context.is_dir():
        raise ComposeError(f"{b.path}.context", f"{b.context} is not a directory (a context "
                           "is relative to the Compose file's directory)")
    if b.dockerfile is not None and not b.dockerfile.is_file():
        raise ComposeError(f"{b.path}.dockerfile", f"no Dockerfile at {b.dockerfile} (it is "
                           "relative to the context)")
    if b.dockerfile is None and b.dockerfile_inline is None and \
            not (b.context / "Dockerfile").is_file():
        raise ComposeError(f"{b.path}.context", f"no Dockerfile in {b.context} (give "
                           "build.dockerfile)")


def placeholder_body(b: BuildSpec, body: Mapping[str, Any]) -> dict[str, Any]:
    """The service's mapping as translated before its build: its image is the build's name
    (the deploy replaces it with the content tag once built)."""
    return {**body, "image": b.name}


# ----------------------------------------------------------------------------- the builds

def build_all(c: Any, builds: list[BuildSpec], show: Callable[[str], Any],
              no_build: bool = False) -> dict[str, str]:
    """Build (or with ``no_build`` find) every service's image on the node ``c`` talks to:
    {service key: content reference}. CliError naming the service on the first failure."""
    from shoal.cli.build import build_image, summary

    if not no_build:
        for b in builds:
            check_paths(b)
    refs: dict[str, str] = {}
    for b in builds:
        if no_build:
            refs[b.key] = _existing(c, b)
            continue
        show(f"Building service {b.key} ({b.context})")
        tmp = None
        dockerfile = str(b.dockerfile or "")
        if b.dockerfile_inline is not None:  # (sent as the context's Dockerfile)
            fd, tmp = tempfile.mkstemp(prefix="shoal-dockerfile-")
            with os.fdopen(fd, "w") as f:
                f.write(b.dockerfile_inline)
            dockerfile = tmp
        try:
            final = build_image(c, str(b.context), dockerfile, tags=(b.name, *b.tags),
                                build_args=b.args, labels=b.labels, no_cache=b.no_cache,
                                network=b.network, target=b.target,
                                secrets=dict(b.secrets), show=show)
        except CliError as exc:
            raise CliError(f"{b.path}: {exc} (nothing deployed)") from None
        finally:
            if tmp is not None:
                os.unlink(tmp)
        refs[b.key] = _content_tag(c, b, str(final["image"]))
        show(f"{summary(final)}: {refs[b.key]}")
    return refs


def _existing(c: Any, b: BuildSpec) -> str:
    """--no-build: the image built (or `image build -t`) under the build's name; one the
    node lacks under the service's ``image:`` is deployed as written, as `docker stack
    deploy` does (the nodes pull it from a peer or its registry)."""
    from urllib.parse import quote

    try:
        info = c.call("GET", f"/v1/images/{quote(b.name, safe='')}")
    except CliError:
        if b.image_given:
            return b.name
        raise CliError(f"{b.path}: --no-build, and there is no image {b.name} on this node "
                       f"(build it: `shoal image build -t {b.name} {b.context}`, or deploy "
                       "without --no-build)") from None
    return _content_tag(c, b, str(info["id"]))


def _content_tag(c: Any, b: BuildSpec, image_id: str) -> str:
    ref = b.content_ref(image_id)
    c.call("POST", "/v1/images/tag", {"source": image_id, "target": ref})
    return ref


def with_images(services: list[Any], stack: str, refs: Mapping[str, str]) -> list[Any]:
    """The stack's specs with each built service's image the content reference."""
    out = []
    for spec in services:
        ref = refs.get(spec.name[len(stack) + 1:])
        out.append(spec if ref is None else _with_image(spec, ref))
    return out


def _with_image(spec: Any, image: str) -> Any:
    import msgspec

    task = spec.task
    return msgspec.structs.replace(spec, task=msgspec.structs.replace(
        task, container=msgspec.structs.replace(task.container, image=image)))


__all__ = ["BuildSpec", "build_all", "placeholder_body", "read_build", "with_images"]
