"""node/netlink.py: IPRoute without the whole of pyroute2, and the package still whole for others.

Each case runs in a fresh interpreter: what is imported is the thing under test, and the
test process itself may already hold pyroute2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_iproute_alone_leaves_the_rest_of_pyroute2_unimported_and_talks_netlink() -> None:
    got = _run("""
        import json, sys
        from shoal.node import network
        mods = [m for m in sys.modules if m.startswith("pyroute2")]
        with network.IPRoute() as ip:  # a real netlink socket: this namespace's links
            names = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]
            addrs = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(label="lo")]
        print(json.dumps({"mods": mods, "names": names, "addrs": addrs}))
    """)
    assert "lo" in got["names"]
    assert "127.0.0.1" in got["addrs"]  # inet_ntop is the real one (pysyncobj's patch undone)
    heavy = [m for m in got["mods"] if m.split(".")[1:2] in (["ndb"], ["ipdb"], ["plan9"])]
    assert heavy == []
    assert len(got["mods"]) < 150  # the whole package is 218 modules


def test_other_code_still_gets_the_whole_package() -> None:
    got = _run("""
        import json, sys
        from shoal.node.netlink import import_iproute
        IPRoute, NetlinkError = import_iproute()
        before = len([m for m in sys.modules if m.startswith("pyroute2")])
        from pyroute2 import config            # a submodule: imported, not the whole package
        middle = len([m for m in sys.modules if m.startswith("pyroute2")])
        import pyroute2
        from pyroute2 import NDB, IPRoute as Same   # a name of __init__.py: runs it, once
        after = len([m for m in sys.modules if m.startswith("pyroute2")])
        print(json.dumps({"before": before, "middle": middle, "after": after,
                          "same": Same is IPRoute, "ndb": NDB.__module__,
                          "version": pyroute2.__version__,
                          "error": NetlinkError is pyroute2.NetlinkError}))
    """)
    assert got["middle"] == got["before"]
    assert got["after"] > got["before"] + 50
    assert got["same"] and got["error"]
    assert got["ndb"] == "pyroute2.ndb.main"
    assert got["version"][0].isdigit()


def test_an_already_imported_pyroute2_is_left_as_it_is() -> None:
    got = _run("""
        import json, pyroute2
        from shoal.node.netlink import import_iproute
        IPRoute, _ = import_iproute()
        print(json.dumps({"same": IPRoute is pyroute2.IPRoute,
                          "getattr": "__getattr__" in vars(pyroute2)}))
    """)
    assert got == {"same": True, "getattr": False}
