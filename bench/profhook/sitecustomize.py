"""A sampling profiler for a running shoal agent, for benchmarks (bench/scale_lab.py
``--profile DIR``): with ``SHOAL_PROFILE_DIR`` set and this directory on PYTHONPATH, every
``shoal agent`` process samples all its threads' stacks (sys._current_frames) every
``SHOAL_PROFILE_INTERVAL`` seconds (default 0.005) and rewrites DIR/prof-PID.json every 2 s:
per function, samples where it was on top of a stack ("self") and anywhere in one ("total"),
and per thread the samples taken — of threads the kernel shows running or runnable only
(/proc/self/task/TID/stat state R: CPU demand, not time blocked in select or a lock).
Read with bench/profile_report.py.

Owns: that sampler thread. Must not touch: anything else in the process (it only reads
frames). Other Python processes with this on their path (the CLI) are left alone.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time


def _where(code: object) -> str:
    c = code  # a code object
    return f"{getattr(c, 'co_filename', '?').split('site-packages/')[-1]}:" \
           f"{getattr(c, 'co_qualname', getattr(c, 'co_name', '?'))}"


def _running(native_id: int | None) -> bool:
    """The kernel thread is running or runnable (state R): sampled as CPU demand."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] == b"R"


def _sample(out_dir: str, interval: float) -> None:
    me = threading.get_ident()
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    path = os.path.join(out_dir, f"prof-{os.getpid()}.json")
    started = last = time.monotonic()
    while True:
        time.sleep(interval)
        live = {t.ident: t for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            t = live.get(ident)
            if ident == me or t is None or not _running(t.native_id):
                continue  # blocked (in select, a lock, a queue): not CPU
            f = frame
            top = _where(f.f_code)
            self_n[top] += 1
            seen = set()
            while f is not None:
                w = _where(f.f_code)
                if w not in seen:
                    seen.add(w)
                    total_n[w] += 1
                f = f.f_back
            threads[t.name] += 1
        samples += 1
        now = time.monotonic()
        if now - last >= 2.0:
            last = now
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"pid": os.getpid(), "seconds": now - started, "samples": samples,
                           "interval": interval, "self": self_n.most_common(200),
                           "total": total_n.most_common(400), "threads": dict(threads)}, fh)
            os.replace(tmp, path)


_dir = os.environ.get("SHOAL_PROFILE_DIR", "")
if _dir and "agent" in sys.argv[1:2]:
    threading.Thread(target=_sample, name="bench-sampler", daemon=True, args=(
        _dir, float(os.environ.get("SHOAL_PROFILE_INTERVAL", "0.005")))).start()
