"""The old-release harness (tests/oldrelease.py): the previous release runs from a temp dir with
this venv, its own code and not today's; the temp dir goes away; a clone without the commit
gets a message that says what to do. No root, no network."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import oldrelease

PROBE = """
import dataclasses, importlib.util
from shoal.raft import models
names = {f.name for f in dataclasses.fields(models.ServiceSpec)}
print("flat" if {"replicas", "image", "command", "ports"} <= names else "nested")
print("has-spec-module" if importlib.util.find_spec("shoal.raft.spec") else "no-spec-module")
print(models.__file__)
"""


def _run(rel: oldrelease.Release, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*argv], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, **rel.env}, cwd=rel.root)


def test_the_old_release_runs_its_own_flat_model_with_this_venv(
        old_release: oldrelease.Release) -> None:
    """`python -m shoal.cli.main` with the release's PYTHONPATH is shoal 0.1: flat ServiceSpec,
    no shoal.raft.spec (today's nested spec), code from the temp dir; its CLI starts."""
    assert old_release.commit.startswith(oldrelease.OLD_RELEASE)
    res = _run(old_release, *old_release.python_c(PROBE))
    assert res.returncode == 0, res.stderr
    flat, spec, path = res.stdout.split()
    assert (flat, spec) == ("flat", "no-spec-module")
    assert path.startswith(str(old_release.root / "shoal" / "raft") + "/"), path
    # the launcher source the old runtime compiles is the old tree's (through the symlink)
    launcher = old_release.root / "shoal" / "runtime" / "launcher.c"
    assert launcher.resolve() == (old_release.root / "tree" / "runtime" / "launcher.c")
    cli = _run(old_release, *old_release.argv, "--help")
    assert cli.returncode == 0 and "usage: shoal" in cli.stdout, cli.stderr


def test_materialise_cleans_up_and_leaves_the_repository_alone(tmp_path: Path) -> None:
    before = subprocess.run(["git", "-C", str(oldrelease.REPO), "status", "--porcelain"],
                            capture_output=True, text=True, check=True).stdout
    with oldrelease.old_release() as rel:
        root = rel.root
        assert (root / "shoal" / "node").is_symlink()
    assert not root.exists()
    after = subprocess.run(["git", "-C", str(oldrelease.REPO), "status", "--porcelain"],
                           capture_output=True, text=True, check=True).stdout
    assert after == before


def test_a_clone_without_the_commit_fails_with_what_to_do(tmp_path: Path) -> None:
    """A shallow clone (as CI would make with a default depth) lacks the release: the harness
    raises, naming the commit and the fix, and leaves no temp dir."""
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{oldrelease.REPO}",
                    str(shallow)], check=True, capture_output=True, timeout=120)
    with pytest.raises(oldrelease.OldReleaseError) as err:
        oldrelease.materialise(repo=shallow, base=tmp_path)
    msg = str(err.value)
    assert oldrelease.OLD_RELEASE in msg and "git fetch --unshallow" in msg, msg
    assert [p.name for p in tmp_path.iterdir()] == ["shallow"]
