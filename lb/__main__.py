"""``python -m shoal.lb --control-fd N``: run one balancer worker process.

Owns: argument parsing and the choice of event loop for the worker. Must not touch: anything
else. Not meant to be started by hand: ``Balancer`` starts it with one end of a socketpair
inherited as descriptor N (see shoal.lb.worker).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import sys

from .worker import serve


def _close_inherited(keep: int) -> None:
    """Close what this process inherited beyond stdio and the control socket: the agent's
    uvloop leaves its spawn's duplicates of the agent's stdio open in the child (libuv's),
    and whatever else an agent holds without close-on-exec would stay open here for the
    worker's whole life. Python's own descriptors are close-on-exec, so only inherited ones
    go."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                    os.close(fd)
            except OSError:  # (the listing's own descriptor, closed by now)
                continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.lb",
                                     description="shoal balancer worker (started by the agent)")
    parser.add_argument("--control-fd", type=int, required=True,
                        help="inherited AF_UNIX SOCK_SEQPACKET control socket")
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LB_LOG", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"shoal-lb[{os.getpid()}] %(levelname)s %(message)s")
    try:
        os.fstat(args.control_fd)
    except OSError:
        parser.error(f"--control-fd {args.control_fd} is not an open descriptor")
    _close_inherited(keep=args.control_fd)
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; a stock loop still works, slower
        return asyncio.run(serve(args.control_fd))
    return uvloop.run(serve(args.control_fd))


if __name__ == "__main__":
    sys.exit(main())
