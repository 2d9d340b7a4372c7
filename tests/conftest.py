"""Shared pytest fixtures: the multi-host lab (``lab_factory``) and the session-start sweep.

Owns: lab lifetimes inside tests. Every lab a test makes is closed after the test, also when it
fails, and a lab that does not close cleanly fails the test's teardown. Tests marked ``netns``
are skipped when not root or when iproute2 is missing. ``old_release``: the previous release
(tests/oldrelease.py) materialised once per session and removed at its end; a clone without
that commit fails the tests that need it (never skips them).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any

import pytest

import netlab
import oldrelease

_LABS = pytest.StashKey[list[netlab.Lab]]()

# Let the agents and CLIs the tests start cache their bytecode. Where the environment sets
# PYTHONDONTWRITEBYTECODE (this machine's does), every process of the editable install
# recompiles shoal's ~2 MB of source: an agent's start costs 1.4 s of CPU instead of 0.6 s,
# hundreds of times per run. The .pyc files go to the work tree's (ignored) __pycache__ dirs.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _can_netns() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "setsid", "tini"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian: iproute2, util-linux, tini; `make venv` installs them)"
    return None


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what crashed earlier runs left behind (labs whose owner process is dead), and let
    SIGTERM (e.g. a CI timeout) unwind like Ctrl-C so fixtures still close their labs."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if _can_netns() is not None:
        return
    removed = netlab.sweep()
    if removed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"netlab sweep removed {len(removed)} leftover(s) of crashed runs:"]
        lines += [f"  {item}" for item in removed]
        if reporter is not None:
            for line in lines:
                reporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave no empty runtime parent cgroup behind: the agents of any test (a lab's, or a
    runtime test's) make /sys/fs/cgroup/*/shoal on their first task."""
    if _can_netns() is None:
        netlab.remove_empty_cgroup_parents()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _can_netns()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    """On a failed test, append each lab host's agent.log tail to the report (the data dirs are
    deleted at teardown, so this is the last chance to see them)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for lab in item.stash.get(_LABS, []):
        for host in lab.hosts:
            if host.agent_log.exists():
                report.sections.append(
                    (f"lab {lab.runid} {host.name} agent.log", host.log_tail(60)))


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., netlab.Lab]]:
    """``make(n_hosts, **kwargs) -> Lab``; every lab made is closed after the test."""
    labs: list[netlab.Lab] = []
    request.node.stash[_LABS] = labs

    def make(n_hosts: int, **kwargs: Any) -> netlab.Lab:
        lab = netlab.Lab(n_hosts, **kwargs)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        failures: list[str] = []
        for lab in labs:
            try:
                left = lab.close()
            except Exception as exc:  # keep closing the others
                left = [f"close() raised {exc!r}"]
            failures += [f"lab {lab.runid}: {item}" for item in left]
        if failures:
            pytest.fail("lab teardown left things behind:\n  " + "\n  ".join(failures))


@pytest.fixture(scope="session")
def old_release() -> Iterator[oldrelease.Release]:
    """shoal 0.1 (``oldrelease.OLD_RELEASE``) runnable with this venv: ``host.use_shoal(
    rel.argv, rel.env)`` runs it on a lab host."""
    try:
        release = oldrelease.materialise()
    except oldrelease.OldReleaseError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield release
    finally:
        release.close()
