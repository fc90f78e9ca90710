"""Run every benchmark of ddlab and write the tables to results/bench/ (``make bench``).

    python -m benchmarks.run                    # everything: DD, then MTT (see benchmarks/README.md for times)
    python -m benchmarks.run --quick            # smoke version of both (fewer repeats and configurations)
    python -m benchmarks.run --only dd          # DD only (= --only speed,memory)
    python -m benchmarks.run --only mtt         # MTT only (all its parts)
    python -m benchmarks.run --only mtt-speed,mtt-memory   # MTT parts: speed, shipped, memory, ipc50, alloc, train

Other flags: ``--threads N`` and ``--out DIR`` go to both; ``--pairs``, ``--big-pairs``, ``--ipc50-steps`` and ``--allocator``
to ``benchmarks/bench_mtt.py`` only. See ``benchmarks/README.md`` for what each table means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_dd, bench_mtt  # noqa: E402

DD_PARTS = ("speed", "memory")
MTT_PARTS = ("speed", "shipped", "memory", "ipc50", "alloc", "train")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ddlab benchmarks (DD and MTT)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None,
                   help="comma list: dd, speed, memory (DD parts), mtt, mtt-speed, mtt-shipped, mtt-memory, mtt-ipc50, mtt-alloc, "
                        "mtt-train")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--big-pairs", type=int, default=None)
    p.add_argument("--allocator", default=None)
    p.add_argument("--ipc50-steps", type=int, default=None)
    args = p.parse_args(argv)

    common = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else []) + \
        (["--out", args.out] if args.out else [])
    mtt_extra = (["--pairs", str(args.pairs)] if args.pairs else []) + \
        (["--big-pairs", str(args.big_pairs)] if args.big_pairs else []) + \
        (["--allocator", args.allocator] if args.allocator else []) + \
        (["--ipc50-steps", str(args.ipc50_steps)] if args.ipc50_steps else [])

    dd, mtt = list(DD_PARTS), list(MTT_PARTS)
    if args.only:
        items = [s.strip() for s in args.only.split(",") if s.strip()]
        dd, mtt = [], []
        for item in items:
            if item == "dd":
                dd += list(DD_PARTS)
            elif item in DD_PARTS:
                dd.append(item)
            elif item == "mtt":
                mtt += list(MTT_PARTS)
            elif item.startswith("mtt-") and item[4:] in MTT_PARTS:
                mtt.append(item[4:])
            else:
                p.error(f"unknown part {item!r}")
    status = 0
    if dd:
        status |= bench_dd.main(common + ([] if len(dd) == 2 else ["--only", dd[0]])) or 0
    if mtt:
        status |= bench_mtt.main(common + mtt_extra + ["--only", ",".join(dict.fromkeys(mtt))]) or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
