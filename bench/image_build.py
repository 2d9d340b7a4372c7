"""Image build benchmark (needs root, Debian's busybox-static): prints figures, never passes
or fails.

Builds a 5-instruction Dockerfile (FROM a busybox-static image, RUN, COPY of a context file of
``--copy-mib`` MiB, ENV, CMD) with the real runtime (each RUN a container) into a fresh image
store, then rebuilds it unchanged ``--rebuilds`` times (all cache hits), and prints the first
build's time, the rebuilds' median, and the ratio (issue 17 must-show 4: rebuild < 10 %).

    .venv/bin/python bench/image_build.py [--copy-mib 16] [--rebuilds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import time
from pathlib import Path

import benchrt  # (bench/ is on sys.path)

from shoal.runtime.build import Builder, BuildOptions

DOCKERFILE = """\
FROM base:1
RUN mkdir -p /app && for i in 1 2 3 4 5 6 7 8; do echo line $i >> /app/log; done
COPY data.bin /app/
ENV GREETING=hi
CMD ["/bin/sh", "-c", "cat /app/log"]
"""


def _rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for name in ("sh", "mkdir", "echo", "cat", "ls"):
        (root / "bin" / name).symlink_to("busybox")
    (root / "tmp").mkdir()
    return root


async def main(args: argparse.Namespace) -> None:
    async with benchrt.controller("shoal-bench-build-", "rt") as (ctl, data):
        ctl.images.import_rootfs("base:1", _rootfs(data / "rootfs"))
        ctx = data / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        (ctx / "data.bin").write_bytes(os.urandom(args.copy_mib << 20))
        builder = Builder(ctl, ctl.images, data / "build")
        t0 = time.perf_counter()
        first = await builder.build(ctx, BuildOptions(tags=("bench:1",)), lambda _: None)
        first_s = time.perf_counter() - t0
        again: list[float] = []
        for _ in range(args.rebuilds):
            t0 = time.perf_counter()
            res = await builder.build(ctx, BuildOptions(tags=("bench:1",)), lambda _: None)
            again.append(time.perf_counter() - t0)
            assert res.image.id == first.image.id and res.layers_created == 0
        med = statistics.median(again)
        print(f"first build        {first_s * 1000:8.1f} ms  ({first.layers_created} layers, "
              f"{args.copy_mib} MiB COPY)")
        print(f"unchanged rebuild  {med * 1000:8.1f} ms  median of {len(again)}, "
              f"{res.cached}/{res.steps} steps cached, 0 layers")
        print(f"rebuild / build    {med / first_s * 100:8.1f} %")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copy-mib", type=int, default=16)
    parser.add_argument("--rebuilds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
