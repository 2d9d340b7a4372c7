"""Registry pull benchmark: shoal's client vs ``skopeo copy`` of the same image (prints
figures, never passes or fails).

A local registry (Debian's docker-registry on 127.0.0.1, TLS from a test CA, htpasswd Basic
auth, as in tests/test_registry.py) holds a multi-layer image of about ``--mib`` MiB
(busybox-static, a marker layer, and ``--layers`` layers of incompressible data). Each round,
alternating which goes first:

* ``skopeo copy docker://… dir:…``: download and verify every blob into a directory;
* shoal ``RegistryClient.pull`` into an empty ImageStore: the same download and verification
  (``fetch``), then the image's layers unpacked for use (``+ unpack``; skopeo does not unpack).

    .venv/bin/python bench/registry_pull.py [--mib 100] [--layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import registryd  # (the test helpers: registry, CA, image layouts)
from helpers import free_port

from shoal.runtime.images import ImageStore
from shoal.runtime.reference import parse_reference
from shoal.runtime.registry import RegistryClient, RegistryConfig, image_config

USERS = {"bench": "bench-pass"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=100, help="total size of the data layers")
    ap.add_argument("--layers", type=int, default=4, help="data layers")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-registry-"))
    reg = registryd.Registry(work / "reg", "127.0.0.1", free_port(), users=USERS)
    try:
        reg.wait_ready()
        layout = work / "layout"
        registryd.build_layout(layout, "big", marker="bench",
                               extra_mib=max(1, args.mib // args.layers),
                               extra_layers=args.layers)
        reg.push(layout, "big", "bench/big:1")
        ref = f"{reg.addr}/bench/big:1"
        certs = work / "certs"
        certs.mkdir()
        shutil.copy(reg.ca, certs / "ca.crt")
        client = RegistryClient(RegistryConfig(ca_file=str(reg.ca)),
                                credentials=lambda _h: ("bench", "bench-pass"))
        man = client.manifest(ref)
        size = sum(s for _, s in man.layers)
        print(f"image {ref}: {len(man.layers)} layers, {size / 2**20:.1f} MiB compressed")
        skopeo_s: list[float] = []
        fetch_s: list[float] = []
        full_s: list[float] = []
        for r in range(args.rounds):
            order = ("skopeo", "shoal") if r % 2 == 0 else ("shoal", "skopeo")
            for who in order:
                out = work / f"out-{who}-{r}"
                if who == "skopeo":
                    t0 = time.perf_counter()
                    subprocess.run([registryd.SKOPEO, "copy", "--quiet", "--src-creds",
                                    "bench:bench-pass", "--src-cert-dir", str(certs),
                                    f"docker://{ref}", f"dir:{out}"], check=True,
                                   env={**os.environ, "HOME": str(work)})
                    skopeo_s.append(time.perf_counter() - t0)
                else:
                    store = ImageStore(out)
                    c = RegistryClient(RegistryConfig(ca_file=str(reg.ca)),
                                       credentials=lambda _h: ("bench", "bench-pass"))
                    parsed = parse_reference(ref)
                    t0 = time.perf_counter()
                    m = c.manifest(parsed)  # (what RegistryClient.pull does, timed in two)
                    cfg = c.config_blob(parsed, m.config_digest)
                    for digest, s in m.layers:
                        c.fetch_blob(parsed, digest, store, s)
                    t1 = time.perf_counter()
                    store.add_image(m.layers, image_config(cfg),
                                    parsed.with_digest(m.digest).store_tags)
                    t2 = time.perf_counter()
                    fetch_s.append(t1 - t0)
                    full_s.append(t2 - t0)
                shutil.rmtree(out, ignore_errors=True)
        med = statistics.median
        print(f"rounds: {args.rounds} (median, seconds; MiB/s of compressed bytes)")
        for name, xs in (("skopeo copy to dir", skopeo_s), ("shoal fetch+verify", fetch_s),
                         ("shoal fetch+verify+unpack", full_s)):
            print(f"  {name:<28} {med(xs):6.2f} s  {size / 2**20 / med(xs):7.1f} MiB/s  "
                  f"(min {min(xs):.2f}, max {max(xs):.2f})")
        print(f"  shoal fetch / skopeo: {med(fetch_s) / med(skopeo_s):.2f}x, "
              f"with unpack: {med(full_s) / med(skopeo_s):.2f}x")
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
