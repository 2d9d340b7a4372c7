"""Where an agent's resident memory goes: libraries imported, and a running agent's mappings.

    .venv/bin/python bench/agent_rss.py            # import cost of each library the agent loads
    .venv/bin/python bench/agent_rss.py --pid PID  # a running agent: shared libraries, heap, anon

Import cost: each library is imported in a fresh interpreter after every *other* library
on the list, so a figure is what that library adds on top of what the others already share
(asyncio, ssl, …), not what it costs alone. The last line imports ``shoal.node.agent``
itself: everything an agent process holds before it does any work.

A running agent (``--pid``): ``/proc/PID/smaps`` grouped into file-backed mappings (shared
libraries and extension modules, shared with every other process using them — PSS divides
them) and anonymous memory (the Python heap: modules' code and objects, the state).
Runs on one core; loads nothing but the interpreter it starts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

# the third-party libraries an agent imports (node/, raft/, gossip/, runtime/, lb/), each as
# the agent imports it: pyroute2's IPRoute without the package's __init__ (node/netlink.py);
# LAZY ones only at first use (tests/test_lazy_imports.py)
LIBRARIES = {
    "uvloop": "import uvloop",
    "aiohttp.web": "import aiohttp.web",
    "cryptography.x509": "import cryptography.x509",
    "cryptography…aead": "import cryptography.hazmat.primitives.ciphers.aead",
    "dns.message": "import dns.message",
    "pysyncobj": "import pysyncobj",
    "prometheus_client": "import prometheus_client",
    "msgspec": "import msgspec",
    "msgpack": "import msgpack",
    "pyroute2 (IPRoute)": "from shoal.node.netlink import import_iproute; import_iproute()",
    "pyroute2 (whole package)": "import pyroute2",
}
IPROUTE, WHOLE = "pyroute2 (IPRoute)", "pyroute2 (whole package)"
# imported at first use, not by an idle agent: x509 where a certificate is made or parsed
# (init, join, signing, renewal; node/pki.py), dnspython at the DNS server's first query
LAZY = {"cryptography.x509", "dns.message"}
# WHOLE is what agents imported before node/netlink.py: shown for comparison, measured after
# the others except IPROUTE, and left out of "the libraries together" (as LAZY ones are)

_PROBE = """
import json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
others, target = json.loads(sys.argv[1]), sys.argv[2]
for statement in others:
    exec(statement)
before, n = rss(), len(sys.modules)
exec(target)
print(rss() - before, len(sys.modules) - n, rss())
"""


def probe(others: list[str], target: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(others), target],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def imports() -> None:
    base = probe([], "import json")[2]
    print(f"interpreter alone: {base / 1024:.1f} MiB")
    print(f"{'library':46} {'adds (KiB)':>10} {'modules':>8}   (after all the others)")
    others = [stmt for name, stmt in LIBRARIES.items() if name != WHOLE]
    for name, stmt in LIBRARIES.items():
        skip = (stmt, LIBRARIES[IPROUTE]) if name == WHOLE else (stmt,)
        added, mods, _ = probe([s for s in others if s not in skip], stmt)
        print(f"{name + (' (at first use)' if name in LAZY else ''):46} {added:10d} {mods:8d}")
    eager = [stmt for name, stmt in LIBRARIES.items() if name != WHOLE and name not in LAZY]
    _, _, libs = probe(eager[1:], eager[0])
    print(f"{'the libraries an idle agent imports, together':46} {'':10} {'':8}   → "
          f"{libs / 1024:.1f} MiB")
    added, mods, total = probe([], "import shoal.node.agent")
    print(f"{'shoal.node.agent (everything)':46} {added:10d} {mods:8d}   "
          f"→ {total / 1024:.1f} MiB resident before any work")


def mappings(pid: int) -> None:
    groups: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if m:
            name = m.group(1).strip()
            continue
        if line.startswith("Rss:"):
            key = name if name.startswith("/") else (name or "[anonymous]")
            groups[key] = groups.get(key, 0) + int(line.split()[1])
    rollup = {k: int(v.split()[0]) for k, v in (
        ln.split(":", 1) for ln in Path(f"/proc/{pid}/smaps_rollup").read_text()
        .splitlines()[1:]) if v.strip().endswith("kB")}
    print(f"pid {pid}: RSS {rollup['Rss'] / 1024:.1f} MiB = anonymous "
          f"{rollup['Anonymous'] / 1024:.1f} MiB + file-backed "
          f"{(rollup['Rss'] - rollup['Anonymous']) / 1024:.1f} MiB; PSS "
          f"{rollup['Pss'] / 1024:.1f} MiB")
    for key, kib in sorted(groups.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {kib:8d} KiB  {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pid", type=int, help="a running agent's pid: its mappings")
    args = ap.parse_args()
    if args.pid:
        mappings(args.pid)
    else:
        imports()


if __name__ == "__main__":
    main()
