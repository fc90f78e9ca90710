"""Run every benchmark of ddlab and write the tables to results/bench/ (``make bench``).

    python -m benchmarks.run            # full version (about 10 minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # smoke version (fewer repeats and configurations)

Other flags (``--only speed|memory``, ``--threads N``, ``--out DIR``) are passed to
``benchmarks/bench_dd.py``; see ``benchmarks/README.md`` for what each table means.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_dd  # noqa: E402


def main(argv=None) -> int:
    return bench_dd.main(argv)


if __name__ == "__main__":
    sys.exit(main())
