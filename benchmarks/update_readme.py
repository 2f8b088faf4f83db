"""Regenerate README.md's benchmark tables from every JSON under benchmarks/results/.

Usage: ``python benchmarks/update_readme.py [--readme README.md] [--results benchmarks/results]``

The section between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced by one block
per device (its environment line, then each suite's table and the command that produced it),
built by :func:`fastblocks.bench.report.readme_section`: nothing in it is typed by hand. Without
the markers the tables are printed to stdout instead (exit status 0, with a note on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed package
    sys.path.insert(0, str(ROOT))

from fastblocks.bench.report import BEGIN, END, readme_section, replace_between_markers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Rewrite the README's benchmark section (or print it when the markers are missing)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to update")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date; write nothing")
    args = parser.parse_args(argv)

    section = readme_section(args.results)
    text = args.readme.read_text() if args.readme.exists() else ""
    updated = replace_between_markers(text, section)
    if updated is None:
        print(f"note: {args.readme} has no {BEGIN} ... {END} markers; printing the tables instead", file=sys.stderr)
        print(section)
        return 0
    if args.check:
        if updated != text:
            print(f"{args.readme}: benchmark section is out of date (run {Path(__file__).name})", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated)
        print(f"updated {args.readme}")
    else:
        print(f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
