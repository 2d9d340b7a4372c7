"""Image references: ``[host[:port]/]path/name[:tag][@sha256:<hex>]`` (Docker's grammar).

Owns: parsing and printing image references, the Docker Hub defaults (no host means
``docker.io``; a one-part path on Docker Hub means ``library/NAME``), and the *familiar* form
the image store tags images with (Docker Hub's prefixes dropped, like ``docker images``
shows them). Must not touch: I/O. shoal.raft.spec keeps a regex for the same grammar (the
state machine cannot import the runtime); tests/test_registry_unit.py checks they agree.

The grammar, as distribution/reference's ``reference.go`` states it::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]     (a first component with '.' or ':', or "localhost",
                                       or an upper-case letter, is a domain)
    path-comp  := [a-z0-9]+ ((\\.|_|__|-+) [a-z0-9]+)*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" [0-9a-f]{64}     (the only algorithm shoal accepts)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.runtime.errors import InvalidReference

DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]{{1,5}})?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
#: One regex for the whole grammar (shoal.raft.spec.IMAGE_RE must accept the same strings).
REFERENCE_RE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised reference. ``tag`` and ``digest`` may be empty (not both after
    ``parse_reference``: a bare name gets ``latest``)."""

    registry: str  # "docker.io", "reg.example:5000", "10.0.0.1:5000"
    repository: str  # "library/busybox", "team/app"
    tag: str = ""
    digest: str = ""  # "sha256:<hex>" or ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The name without Docker Hub's defaults: ``busybox``, ``user/app``,
        ``reg:5000/team/app``."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return self.name

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def familiar(self) -> str:
        """The reference as a user would write it (and as the image store tags it)."""
        out = self.familiar_name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    @property
    def store_tags(self) -> tuple[str, ...]:
        """The tags a pulled image gets in the image store: ``name:tag`` (if it has a tag)
        and ``name@digest`` (if it has a digest)."""
        out = []
        if self.tag:
            out.append(f"{self.familiar_name}:{self.tag}")
        if self.digest:
            out.append(f"{self.familiar_name}@{self.digest}")
        return tuple(out)


def split_domain(text: str) -> tuple[str, str]:
    """("domain", "rest") when the first component names a registry, else ("", text)."""
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"
                or first != first.lower()):
        return first, rest
    return "", text


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise InvalidReference naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("an image reference is required")
    m = REFERENCE_RE.match(text)
    if m is None:
        if text != text.strip():
            raise InvalidReference(f"image reference {text!r} has surrounding spaces")
        name_part = re.split(r"[:@]", split_domain(text)[1], maxsplit=1)[0]
        if name_part != name_part.lower():
            raise InvalidReference(f"image reference {text!r}: the repository name must be "
                                   "lower-case")
        raise InvalidReference(f"{text!r} is not an image reference "
                               "([HOST[:PORT]/]PATH/NAME[:TAG][@sha256:DIGEST])")
    domain, path = m.group("domain"), m.group("path")
    if domain is None:
        # the regex may have taken a domain-looking first part as a path (no '.' or ':')
        domain_part, rest = split_domain(path)
        domain, path = (domain_part, rest) if domain_part else ("", path)
    elif not ("." in domain or ":" in domain or domain == "localhost"
              or domain != domain.lower()):
        path = f"{domain}/{path}"  # "team/app": "team" is a path component, not a host
        domain = ""
    if not domain or domain in _HUB_ALIASES:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise InvalidReference(f"image name {text!r} is longer than {MAX_NAME} characters")
    tag, digest = m.group("tag") or "", m.group("digest") or ""
    if not tag and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def has_registry_host(text: str) -> bool:
    """Whether the reference names its registry explicitly (``reg:5000/app``,
    ``docker.io/x``), as opposed to a bare name (``app:1``) that may be a local image."""
    return bool(split_domain(text)[0])


__all__ = ["DOCKER_HUB", "REFERENCE_RE", "InvalidReference", "Reference", "has_registry_host",
           "parse_reference", "split_domain"]
