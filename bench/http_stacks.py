"""RSS that each candidate HTTP stack adds to a process, for choosing the agent's HTTP library.

    python3 -m venv /tmp/httpvenv
    /tmp/httpvenv/bin/pip install uvicorn h11 wsproto starlette httpx websockets aiohttp==X.Y.Z
    .venv/bin/python bench/http_stacks.py /tmp/httpvenv/bin/python

Runs the given interpreter (a scratch venv: these are not shoal's dependencies) fresh for each
stack, five times, and prints the median RSS the stack's imports add on top of what an agent
imports anyway (asyncio, ssl, json, email.utils, http, http.client, urllib.parse), with the
number of modules they bring. The same probe as bench/agent_rss.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

BASE = "import asyncio, ssl, json, email.utils, http, http.client, urllib.parse"
_PROBE = """
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
exec(sys.argv[1])
before, n = rss(), len(sys.modules)
exec(sys.argv[2])
print(rss() - before, len(sys.modules) - n)
"""
_UVICORN = ("import uvicorn.server, uvicorn.config, uvicorn.protocols.http.h11_impl, "
            "uvicorn.protocols.websockets.wsproto_impl")
_STARLETTE = ("import starlette.routing, starlette.requests, starlette.responses, "
              "starlette.websockets, starlette.applications")
STACKS = {
    "h11 + wsproto (protocol machines only)": "import h11, wsproto, wsproto.connection",
    "uvicorn's server (h11 + wsproto protocols)": _UVICORN,
    "starlette (routing, requests, responses, websockets)": _STARLETTE,
    "uvicorn + starlette": f"{_UVICORN}; {_STARLETTE}",
    "httpx (client)": "import httpx",
    "websockets (asyncio server + client)":
        "import websockets.asyncio.server, websockets.asyncio.client",
    "uvicorn + starlette + httpx + websockets client":
        f"{_UVICORN}; {_STARLETTE}; import httpx, websockets.asyncio.client",
    "aiohttp.web + aiohttp (what shoal imports)": "import aiohttp, aiohttp.web",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("python", help="the scratch venv's interpreter")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"{'stack':52} {'adds (MiB)':>10} {'modules':>8}   (median of {args.runs})")
    for name, stmt in STACKS.items():
        runs = [subprocess.run([args.python, "-c", _PROBE, BASE, stmt], check=True,
                               capture_output=True, text=True).stdout.split()
                for _ in range(args.runs)]
        kib = statistics.median(int(r[0]) for r in runs)
        print(f"{name:52} {kib / 1024:10.1f} {runs[0][1]:>8}")


if __name__ == "__main__":
    main()
