"""What an idle agent does not import (issue 16: agent RSS), and that those paths still work.

An agent imports a few libraries and modules only when it first uses them, each with a
function-local import and a one-line comment saying why:

* dnspython (~2.6 MiB): node/dns.py, at the DNS server's first query — the server itself
  listens on every node, but an agent whose tasks never ask for a name never parses one;
* the web dashboard (node/api.py, only when ``--dashboard-addr`` serves it), ``image save``
  (node/imageapi.py → runtime/imagesave.py), ``image push`` (node/registries.py →
  runtime/regpush.py) and ``image build`` (runtime/build.py, runtime/buildstages.py — the
  prefix covers it — and runtime/dockerfile.py; the worker needs only ``BUILD_TASK_PREFIX``,
  in runtime/records.py) — ~0.4 MiB together;
* ``importlib.metadata`` (~1.4 MiB with zipfile and csv): the version is a constant in
  node/version.py, which pyproject.toml reads, not the installed distribution's metadata;
* the ``unittest`` package's test machinery (~0.8 MiB: its case, loader, runner, difflib):
  pyroute2 imports ``unittest.mock`` at module level for a mode shoal never uses;
  node/netlink.py registers the package bare while pyroute2 loads (see there).

The first test fails when someone imports one of them at module level again (directly or
through a module that does); it runs in a fresh interpreter, since this test process may
already hold them. The lazily imported paths themselves are exercised by:
tests/test_dns.py, tests/test_stack_dns.py, tests/test_task_dns.py,
tests/test_network_aliases.py (queries answered, forwarded, refused, truncated);
tests/test_dashboard.py and tests/test_dashboard_cluster.py (the dashboard);
tests/test_image_save.py (``image save`` through the API handler); tests/test_build.py,
tests/test_build_unit.py, tests/test_build_cluster.py (``image build``); the push below, and
tests/test_registry_cluster.py (``image push`` to a real registry).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# the modules an idle agent must not hold (a name ending in "." means the whole package)
LAZY = ("dns.", "shoal.node.dashboard", "shoal.runtime.build", "shoal.runtime.dockerfile",
        "shoal.runtime.imagesave", "shoal.runtime.regpush", "importlib.metadata",
        "unittest.case")


def _imported_by(statement: str) -> list[str]:
    code = (f"import json, sys\n{statement}\n"
            f"lazy = {LAZY!r}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(lazy) or "
            "m + '.' in lazy)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", [
    "import shoal.node.agent",  # everything an agent process imports before it starts
    "import shoal.cli.main",  # the CLI (`shoal agent` imports the agent from here)
])
def test_an_idle_agent_imports_neither_dnspython_nor_the_dashboard_nor_image_build_save_push(
        statement: str) -> None:
    assert _imported_by(statement) == []


def test_the_dns_server_still_answers_after_importing_dnspython_at_its_first_query() -> None:
    """A fresh interpreter: dnspython is loaded by the server's first query, not before."""
    code = """
import asyncio, json, socket, sys
from shoal.node.dns import serve

async def main():
    transport, server = await serve(lambda name: ["10.0.0.7"] if name == "web" else None,
                                    "127.0.0.1", 0)
    before = "dns.message" in sys.modules
    port = transport.get_extra_info("sockname")[1]
    # a hand-made A query for web.shoal (id 0x1234, RD), so the client needs no dnspython
    query = (bytes.fromhex("123401000001000000000000") + b"\\x03web\\x05shoal\\x00"
             + bytes.fromhex("00010001"))
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, query)
        reply = await asyncio.wait_for(loop.sock_recv(s, 512), 5)
    transport.close()
    print(json.dumps({"before": before, "after": "dns.message" in sys.modules,
                      "id": reply[:2].hex(), "answers": int.from_bytes(reply[6:8], "big"),
                      "address": list(reply[-4:])}))

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"before": False, "after": True, "id": "1234", "answers": 1,
                   "address": [10, 0, 0, 7]}


def test_an_image_push_reaches_the_pusher_it_imports_at_first_use(tmp_path: Path) -> None:
    """``Registries.push`` of an image this node does not have: the pusher (imported by the
    push) looks for it and the error is the API's 404, not an ImportError."""
    from shoal.node.errors import ApiError
    from shoal.node.registries import Registries
    from shoal.runtime.images import ImageStore
    from shoal.runtime.registry import RegistryConfig

    ctx: Any = SimpleNamespace(store=None, identity=None)  # (no stored credentials)
    regs = Registries(ctx, None, None, RegistryConfig(), ImageStore(tmp_path / "img"),  # type: ignore[arg-type]
                      None)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as err:
        asyncio.run(regs.push("127.0.0.1:9/team/app:1"))
    assert err.value.status == 404, err.value


def test_an_agent_reads_its_own_certificate_as_tls_does_and_falls_back_to_parsing_it(
        tmp_path: Path) -> None:
    """``pki.own_info`` (Security.load: an agent's own certificate without
    cryptography.x509) gives what parsing the file gives; a certificate its CA does not
    accept (expired, another CA) gives None, and the caller parses the file instead."""
    import time

    from shoal.node import pki

    now = time.time()
    ca_pem, ca_key = pki.create_ca("c1", now)
    ca = pki.CertificateAuthority(ca_pem, ca_key)
    key = pki.new_key()
    files = pki.TlsFiles(tmp_path / "tls")

    def own(cert: bytes, trust: bytes = ca_pem) -> pki.CertInfo | None:
        files.save(ca_pem, cert, pki.key_pem(key))
        return pki.own_info(pki.server_context(ca_pem, files.cert, False), trust)

    cert = ca.issue(pki.make_csr(key), "n1", pki.ROLE_WORKER, "c1", now, 86400, "10.0.0.1")
    assert own(cert) == files.info() == pki.cert_info(cert)
    assert own(cert).role == pki.ROLE_WORKER  # type: ignore[union-attr]
    expired = ca.issue(pki.make_csr(key), "n1", pki.ROLE_WORKER, "c1", now - 10 * 86400, 86400)
    assert own(expired) is None
    assert own(cert, pki.create_ca("c2", now)[0]) is None
    # during a CA rotation: a certificate of the new root, chained through the cross-signed
    # root, checked against the bundle of both roots (what ca.pem holds then)
    new_pem, new_key = pki.create_ca("c1", now, rotated=True)
    cross = ca.cross_sign(new_pem, now)
    issued = pki.CertificateAuthority(new_pem, new_key).issue(
        pki.make_csr(key), "n1", pki.ROLE_MANAGER, "c1", now, 86400)
    got = own(pki.bundle(issued, cross), pki.bundle(ca_pem, new_pem))
    assert got == pki.cert_info(issued) and got.role == pki.ROLE_MANAGER  # type: ignore[union-attr]


def test_a_cli_and_an_agent_import_cryptography_x509_only_to_make_or_parse_a_certificate() -> None:
    code = """
import json, sys
import shoal.cli.main, shoal.node.agent, shoal.node.security
print(json.dumps(sorted(m for m in sys.modules if m.startswith("cryptography.x509"))))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_unittest_registered_bare_for_pyroute2_is_whole_for_any_later_user() -> None:
    """After the agent's netlink import, ``unittest`` has run no ``__init__.py`` yet; the
    first name asked of it runs it, into the same module object, and the mock pyroute2
    imported is the one ``unittest.mock`` names."""
    code = """
import sys
from shoal.node.network import IPRoute
bare = sys.modules["unittest"]
assert "unittest.case" not in sys.modules, sorted(m for m in sys.modules if "unittest" in m)
import unittest
from unittest import mock
assert unittest is bare and unittest.mock is mock
assert issubclass(unittest.TestCase, object) and unittest.main and mock.Mock()
import pyroute2.netlink.rtnl.iprsocket as iprsocket
assert iprsocket.mock is mock
with IPRoute() as ipr:
    assert ipr.link_lookup(ifname="lo")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unittest_main_after_the_netlink_import_is_the_test_program_not_its_module() -> None:
    """``unittest.main`` names both a submodule and, once the package's ``__init__.py`` has
    run, the ``TestProgram`` it imports from there: asked first of the bare package it is
    the program still (a script's ``unittest.main()`` runs its tests)."""
    code = """
import sys
from shoal.node.network import IPRoute
assert "unittest.case" not in sys.modules
import unittest
first = unittest.main
assert first is unittest.TestProgram, first
from unittest import main
assert main is unittest.TestProgram
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_dir_of_unittest_after_the_netlink_import_lists_the_whole_package() -> None:
    """``dir()`` (and so ``help()``, tab completion) of the bare package lists what its
    ``__init__.py`` defines, not only the submodules loaded so far."""
    code = """
import sys
from shoal.node.network import IPRoute
assert "unittest.case" not in sys.modules
import unittest
names = dir(unittest)
assert "TestCase" in names and "main" in names and unittest.__doc__, names
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
