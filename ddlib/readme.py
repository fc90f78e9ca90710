"""Regenerate the results table in README.md from ``results/summary.csv``.

    python -m ddlib.readme [--summary PATH] [--readme PATH] [--check]

The table replaces whatever lies between the ``<!-- results:start -->`` and
``<!-- results:end -->`` markers. By default it reads the repository's committed
``results/summary.csv`` (not ``$DDLIB_RESULTS``, which the tests point at a scratch folder).
``--check`` changes nothing and exits 1 if README.md is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddlib.results import SCALES, read_summary, repo_root

START = "<!-- results:start -->"
END = "<!-- results:end -->"
HEADER = ("notebook", "scale", "dataset", "model", "method", "setting", "metric", "value",
          "paper (%)", "runs", "seconds")
NO_RESULTS = "_No results yet: run `make reproduce` to fill this table._"


def is_accuracy(metric: str) -> bool:
    """Accuracies are stored as fractions and shown as percentages."""
    return "acc" in metric.lower()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def format_value(metric: str, value: str, std: str = "") -> str:
    """``0.9412, 0.012`` -> ``94.1% ± 1.2`` for accuracies; other metrics keep 4 significant digits."""
    v, s = _number(value), _number(std)
    if v is None:
        return value or ""
    if is_accuracy(metric):
        text = f"{100 * v:.1f}%"
        return text + (f" ± {100 * s:.1f}" if s is not None else "")
    text = f"{v:.4g}"
    return text + (f" ± {s:.2g}" if s is not None else "")


def format_paper(metric: str, value: str) -> str:
    v = _number(value)
    if v is None:
        return value or ""
    return f"{100 * v:.1f}" if is_accuracy(metric) else f"{v:.4g}"


def format_seconds(value: str) -> str:
    v = _number(value)
    if v is None:
        return value or ""
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def sort_key(row: dict) -> tuple:
    """Notebook, then quick before paper, then dataset, model, method, setting, metric."""
    scale = row.get("scale", "")
    scale_rank = SCALES.index(scale) if scale in SCALES else len(SCALES)
    rest = tuple(row.get(c, "") for c in ("dataset", "model", "method", "setting", "metric"))
    return (row.get("notebook", ""), scale_rank, scale) + rest


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[dict]) -> str:
    """The Markdown table for ``rows`` (summary.csv dicts), or a one-line note when empty."""
    if not rows:
        return NO_RESULTS
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---:" if h in ("value", "paper (%)", "runs", "seconds") else "---" for h in HEADER) + "|"]
    for r in sorted(rows, key=sort_key):
        metric = r.get("metric", "")
        cells = [r.get(c, "") for c in ("notebook", "scale", "dataset", "model", "method", "setting", "metric")]
        cells += [format_value(metric, r.get("value", ""), r.get("std", "")),
                  format_paper(metric, r.get("paper_value", "")),
                  r.get("runs", ""), format_seconds(r.get("seconds", ""))]
        lines.append("| " + " | ".join(_escape(str(c)) for c in cells) + " |")
    return "\n".join(lines)


def update_text(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README has no {START} ... {END} block")
    return readme[: start + len(START)] + "\n" + table + "\n" + readme[end:]


def load_rows(summary: Path) -> list[dict]:
    """Rows of ``summary``; a missing or empty file has none."""
    if not summary.exists() or not summary.read_text().strip():
        return []
    return read_summary(summary)


def default_summary() -> Path:
    return repo_root() / "results" / "summary.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddlib.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--summary", type=Path, default=None, help="summary CSV (default: <repo>/results/summary.csv)")
    parser.add_argument("--readme", type=Path, default=repo_root() / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date; write nothing")
    args = parser.parse_args(argv)

    summary = args.summary or default_summary()
    rows = load_rows(summary)
    old = args.readme.read_text()
    try:
        new = update_text(old, render_table(rows))
    except ValueError as exc:
        print(f"error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date with {summary}; run `python -m ddlib.readme`", file=sys.stderr)
            return 1
        print(f"{args.readme} is up to date")
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"updated the results table in {args.readme} ({len(rows)} rows)")
    else:
        print(f"{args.readme} already up to date ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
