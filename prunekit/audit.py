"""Check a run's artifacts against its provenance record.

    python -m prunekit.audit                        # reports/provenance.json, paths under .
    python -m prunekit.audit path/to/provenance.json --root path/to/project

Re-hashes (sha256) every file the record lists and prints each one that is missing, changed or
new in a recorded folder. Exit status 0 when everything matches, 1 when anything differs, 2 when
the record cannot be read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .provenance import audit, read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunekit.audit", description=__doc__.splitlines()[0])
    parser.add_argument("record", nargs="?", default="reports/provenance.json", type=Path)
    parser.add_argument("--root", default=Path.cwd(), type=Path, help="project root the record's paths are under")
    args = parser.parse_args(argv)
    try:
        record = read(args.record)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.record}: {exc}", file=sys.stderr)
        return 2
    problems = audit(record, args.root)
    n_files = sum(len(a["files"]) for a in record["artifacts"].values())
    for line in problems:
        print(line)
    commit = record.get("git", {}).get("commit")
    print(f"{len(problems)} difference(s) in {n_files} files of {len(record['artifacts'])} artifacts "
          f"(record of {record.get('created')}, commit {commit or 'unknown'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
