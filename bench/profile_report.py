"""Print what a sampled agent spent its time on (dumps of bench/profhook/sitecustomize.py).

    .venv/bin/python bench/profile_report.py DIR/prof-PID.json [--top 25]

Owns: reading one dump and printing the functions most often on top of a stack ("self")
and anywhere in one ("total", inclusive), as % of the samples of all threads. Must not touch
anything else.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def report(data: dict[str, Any], top: int = 25) -> str:
    n = max(1, int(data["samples"]))
    lines = [f"{data['samples']} samples over {data['seconds']:.0f} s "
             f"(every {data['interval'] * 1000:.0f} ms); threads: " +
             ", ".join(f"{k} {100 * v / n:.0f} %" for k, v in
                       sorted(data["threads"].items(), key=lambda kv: -kv[1])[:6])]
    for kind in ("self", "total"):
        lines.append(f"  {kind} (% of samples, one thread busy = 100 %):")
        for where, count in data[kind][:top]:
            lines.append(f"    {100 * count / n:6.1f} %  {where}")
    return "\n".join(lines)


def diff(after: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """What was sampled between two dumps of one process (``before`` None: since start)."""
    if before is None:
        return after
    out = dict(after)
    out["samples"] = after["samples"] - before["samples"]
    out["seconds"] = after["seconds"] - before["seconds"]
    for kind in ("self", "total"):
        old = dict(before[kind])
        rows = [(w, c - old.get(w, 0)) for w, c in after[kind]]
        out[kind] = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    out["threads"] = {k: v - before["threads"].get(k, 0) for k, v in after["threads"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.dump) as fh:
        print(report(json.load(fh), args.top))


if __name__ == "__main__":
    main()
