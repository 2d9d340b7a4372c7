"""A previous release of shoal, runnable next to today's code (for the rolling-upgrade test).

Owns: one temp dir per use holding a commit's files (``git archive COMMIT | tar -x``) and a
``shoal/`` package whose subpackages are symlinks into them (``shoal.node`` = ``tree/node``,
as pyproject's package-dir maps them), and the command + environment that run that release:
``PYTHON -m _release_main ...`` with ``PYTHONPATH=DIR``, where ``DIR/_release_main.py`` runs
``shoal.cli.main`` as ``python -m shoal.cli.main`` would. The interpreter is this venv's, so
the old code runs with today's third-party packages. ``PYTHONPATH`` comes before the venv's
editable-install finder (a meta-path hook appended after the path finder), so every module
the old tree has resolves there; but that finder would still answer for a module the old
tree lacks (``shoal.raft.spec`` came from today's repository), so ``_release_main`` removes
it from ``sys.meta_path`` first. ``materialise()`` checks the result before handing it out.

The runtime needs no extra step: an agent builds its task launcher from the ``launcher.c``
next to its ``runtime/launcher.py`` (here: the old tree's, through the symlink) into
``DATA_DIR/bin/shoal-launcher-<digest of the source>``, so the old and the new release keep
separate binaries in one data dir. Python's bytecode caches land in the temp dir too.

Must not touch: the repository's work tree, index and refs (``git archive`` only reads
objects), the venv, anything outside its temp dir; ``close()`` removes the temp dir.

Errors::

    OldReleaseError   the commit is not in this clone (a shallow clone: fetch the history),
                      git or tar failed, or the tree does not import as the old release
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# shoal 0.1: the flat ServiceSpec, data schema 1 (shoal.raft.schema's history)
OLD_RELEASE = "e37643f"
PACKAGES = ("node", "raft", "gossip", "runtime", "cli", "lb")
BOOT = "_release_main"
_BOOT_SOURCE = '''"""Runs shoal.cli.main of this directory's tree (tests/oldrelease.py): the venv's
editable finder for today's shoal.* is removed first, so nothing falls back to today's code."""
import runpy
import sys


def _todays_shoal(finder: object) -> bool:
    module = getattr(finder, "__module__", "") or type(finder).__module__
    return module.startswith("__editable__") and "shoal" in module


sys.meta_path[:] = [f for f in sys.meta_path if not _todays_shoal(f)]
for _name in [m for m in sys.modules if m == "shoal" or m.startswith("shoal.")]:
    del sys.modules[_name]

if __name__ == "__main__":
    runpy.run_module("shoal.cli.main", run_name="__main__", alter_sys=True)
'''


class OldReleaseError(Exception):
    """The old release could not be made runnable (the message says why and what to do)."""


@dataclass(frozen=True)
class Release:
    """A materialised release: run it with ``argv`` and ``env`` (added to the environment)."""

    commit: str  # full hash
    root: Path  # the temp dir: tree/ (the commit's files) and shoal/ (the package)
    python: str  # interpreter (this venv's)

    @property
    def argv(self) -> list[str]:
        """The ``shoal`` command of this release."""
        return [self.python, "-m", BOOT]

    def python_c(self, code: str) -> list[str]:
        """``python -c CODE`` importing this release only (run it with ``env``)."""
        return [self.python, "-c", f"import {BOOT}\n{code}"]

    @property
    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root)}

    def close(self) -> None:
        """Remove the temp dir (idempotent)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OldReleaseError(f"cannot run git in {repo}: {exc}") from exc


def resolve(commit: str = OLD_RELEASE, repo: Path = REPO) -> str:
    """The full hash of ``commit`` in ``repo``; OldReleaseError if this clone lacks it."""
    res = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if res.returncode != 0:
        shallow = _git(repo, "rev-parse", "--is-shallow-repository").stdout.strip()
        hint = (" This clone is shallow: run `git fetch --unshallow` (CI: clone with full "
                "history, e.g. fetch-depth 0)." if shallow == "true" else
                " Clone with full history (no --depth, no --single-branch filter).")
        raise OldReleaseError(
            f"commit {commit} (the previous release, shoal 0.1) is not in the git repository "
            f"at {repo}: the rolling-upgrade test runs that release's agent.{hint} "
            f"git said: {res.stderr.strip() or res.stdout.strip() or 'nothing'}")
    return res.stdout.strip()


def materialise(commit: str = OLD_RELEASE, repo: Path = REPO, python: str | None = None,
                base: Path | None = None) -> Release:
    """Extract ``commit`` into a new temp dir (under ``base``, default the system's) and
    build the ``shoal`` package over it. The caller closes the returned Release."""
    full = resolve(commit, repo)
    root = Path(tempfile.mkdtemp(prefix=f"shoal-release-{full[:7]}-", dir=base))
    release = Release(commit=full, root=root,
                      python=python or os.path.abspath(sys.executable))  # not resolved: venv
    try:
        tree = root / "tree"
        tree.mkdir()
        _extract(repo, full, tree)
        pkg = root / "shoal"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f'"""shoal at {full} (tests/oldrelease.py)."""\n')
        (root / f"{BOOT}.py").write_text(_BOOT_SOURCE)
        for name in PACKAGES:
            if not (tree / name / "__init__.py").is_file():
                raise OldReleaseError(f"commit {full[:12]} has no package {name}/")
            (pkg / name).symlink_to(tree / name, target_is_directory=True)
        if not (pkg / "runtime" / "launcher.c").is_file():
            raise OldReleaseError(f"commit {full[:12]} has no runtime/launcher.c")
        _check_imports(release)
    except BaseException:
        release.close()
        raise
    return release


def _extract(repo: Path, commit: str, dest: Path) -> None:
    """``git archive COMMIT | tar -x -C DEST``."""
    with subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as archive:
        assert archive.stdout is not None
        try:
            tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout,
                                 capture_output=True, timeout=120, check=False)
        finally:
            archive.stdout.close()
        err = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
        try:
            rc = archive.wait(timeout=60)
        except subprocess.TimeoutExpired:
            archive.kill()
            rc = archive.wait()
    if rc != 0 or tar.returncode != 0:
        raise OldReleaseError(f"git archive {commit[:12]} | tar -x failed (git {rc}: "
                              f"{err.strip()}; tar {tar.returncode}: "
                              f"{tar.stderr.decode(errors='replace').strip()})")


def _check_imports(release: Release) -> None:
    """Every ``shoal.X`` must import from the release's tree, not from the venv's editable
    install (which maps ``shoal.*`` to today's repository)."""
    code = ("import importlib\n"
            f"for name in {PACKAGES!r}:\n"
            "    m = importlib.import_module('shoal.' + name)\n"
            "    print(name, m.__file__)\n"
            "import shoal.cli.main\n")
    env = {"PATH": "/usr/bin:/bin", **release.env, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        res = subprocess.run(release.python_c(code), capture_output=True, text=True,
                             cwd=release.root, env=env, stdin=subprocess.DEVNULL, timeout=60,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OldReleaseError(f"cannot run {release.python}: {exc}") from exc
    if res.returncode != 0:
        raise OldReleaseError(f"the release at {release.root} does not import:\n{res.stderr}")
    pkg = str(release.root / "shoal") + "/"
    wrong = [line for line in res.stdout.splitlines() if pkg not in line]
    if wrong:
        raise OldReleaseError(f"shoal.* resolves outside {pkg} with PYTHONPATH={release.root}:"
                              f" {wrong}")


@contextlib.contextmanager
def old_release(commit: str = OLD_RELEASE) -> Iterator[Release]:
    """``with old_release() as rel:`` — materialise, yield, remove."""
    release = materialise(commit)
    try:
        yield release
    finally:
        release.close()
