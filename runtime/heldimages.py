"""The images the running builds of this process stand on (``shoal image build``'s base
images, cache hits and step results so far).

Owns: that process-wide set (``holding`` for one build, ``held_images`` for all of them),
read by ImageStore, under its lock, with the images tasks use: the image GC pass, ``image
prune``, ``image rm`` and ``builder prune`` leave them, so a build never loses an image or
a layer it has yet to use. Must not touch: anything else (no imports: the image store reads
it on every removal, an agent that never builds included).

Written only from the builds' event loop; ``held_images`` may be called from any thread
(the store's removals run in threads): copying a list and a union of sets of strings run
without releasing the GIL, so a reader sees each build's set whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# the images each running build of this process stands on so far (base, hits, results)
_HELD: list[set[str]] = []


@contextlib.contextmanager
def holding() -> Iterator[set[str]]:
    """A set for one build's images, seen by ``held_images`` until the build ends."""
    held: set[str] = set()
    _HELD.append(held)
    try:
        yield held
    finally:  # (this build's set, not one of equal content: list.remove compares by ==)
        _HELD[:] = [h for h in _HELD if h is not held]


def held_images() -> set[str]:
    """The images the running builds of this process use."""
    return set().union(*list(_HELD))


__all__ = ["held_images", "holding"]
