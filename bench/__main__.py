"""Benchmarks of chatmail push: run with ``bench/run [--quick] [--only SECTION]``.

Each section prints a table with its figures next to a baseline measured in the
same run, and the run ends with one summary table of figure, value, target and
whether it was met.  Nothing here asserts a timing: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import traceback

from bench.table import Figure, print_summary

SECTIONS = {
    "dict": "bench.bench_dict",
    "imap": "bench.bench_imap",
    "notifier": "bench.bench_notifier",
    "proxy": "bench.bench_proxy",
    "openpgp": "bench.bench_openpgp",
    "webpush": "bench.bench_webpush",
    "heartbeat": "bench.bench_heartbeat",
    "faults": "bench.bench_faults",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts (under 2 minutes)")
    p.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only this section (repeatable)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    wanted = args.only or list(SECTIONS)
    figures: list[Figure] = []
    started = time.monotonic()
    print(f"chatmail push benchmarks ({'quick' if args.quick else 'full'} run)", flush=True)
    for name in SECTIONS:
        if name not in wanted:
            continue
        t0 = time.monotonic()
        print(f"\n### section {name}", flush=True)
        try:
            module = importlib.import_module(SECTIONS[name])
            figures.extend(module.run(args.quick))
        except Exception:
            traceback.print_exc()
            figures.append(Figure(f"section {name}", None, "", "runs", False))
        print(f"(section {name}: {time.monotonic() - t0:.1f} s)", flush=True)
    print_summary(figures)
    print(f"total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
