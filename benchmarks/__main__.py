"""``python -m benchmarks``: run the comparisons, print their tables, write JSON results.

Examples::

    python -m benchmarks                          # everything, ~55 minutes on 2 cores
    python -m benchmarks --profile quick          # everything, ~7 minutes
    python -m benchmarks --only checkout burst    # some comparisons
    DBPOOL_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python -m benchmarks

Without ``DBPOOL_BENCH_DATABASE_URL`` (or ``--database-url``) an embedded PostgreSQL is
started in a temporary directory for the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .common import (
    DATABASE_URL_ENV,
    PROFILES,
    RESULTS_DIR,
    BenchContext,
    Report,
    Table,
    bench_database,
    feature_status,
    machine_info,
    prepare_database,
    run_async,
    write_json,
)

#: Comparison name -> module, in the order they run.
COMPARISONS = {
    "http": "benchmarks.http_throughput",
    "http_pairs": "benchmarks.http_pairs",
    "overhead": "benchmarks.overhead",
    "inproc_pairs": "benchmarks.inproc_pairs",
    "instructions": "benchmarks.instructions",
    "http_instructions": "benchmarks.http_instructions",
    "checkout": "benchmarks.checkout",
    "burst": "benchmarks.burst",
    "burst_http": "benchmarks.burst_http",
    "memory": "benchmarks.memory",
    "features": "benchmarks.features",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument(
        "--only", nargs="+", choices=list(COMPARISONS), metavar="NAME", help="run only these"
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds (default: profile's)")
    parser.add_argument(
        "--pair-rounds", type=int, help="rounds of 1b, HTTP head to head (default: profile's)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help=f"benchmark this database (default ${DATABASE_URL_ENV}, else an embedded one)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--no-wrk", action="store_true", help="use the Python load generator even if wrk exists"
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.rounds is not None:
        profile = dataclasses.replace(profile, rounds=max(1, args.rounds))
    if args.pair_rounds is not None:
        profile = dataclasses.replace(profile, pair_rounds=max(1, args.pair_rounds))
    names = args.only or list(COMPARISONS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    reports: list[Report] = []
    failed: list[str] = []
    with bench_database(args.database_url) as url:
        server_version = run_async(lambda: prepare_database(url, profile.items))
        machine = {**machine_info(), "postgresql": server_version}
        features = feature_status()
        ctx = BenchContext(
            profile=profile,
            database_url=url,
            use_wrk=not args.no_wrk and shutil.which("wrk") is not None,
            verbose=not args.quiet,
        )
        header = {
            "stamp": stamp,
            "profile": dataclasses.asdict(profile),
            "machine": machine,
            "features": features,
            "database": "embedded" if not args.database_url else "external",
            "load_generator": "wrk" if ctx.use_wrk else "python",
        }
        print(describe(header))
        for name in names:
            module = importlib.import_module(COMPARISONS[name])
            t0 = time.perf_counter()
            try:
                report: Report = module.run(ctx)
            except Exception:
                failed.append(name)
                traceback.print_exc()
                continue
            report.seconds = time.perf_counter() - t0
            reports.append(report)
            print(report.render(), flush=True)
            write_json(report, args.results_dir, stamp, header)
    summary = targets_table(reports)
    print(summary.render())
    elapsed = time.perf_counter() - started
    print(f"\n{len(reports)} comparisons in {elapsed:.0f} s; results in {args.results_dir}")
    summary_path = args.results_dir / f"{stamp}-summary.json"
    summary_path.write_text(
        json.dumps(
            {**header, "seconds": round(elapsed, 1), "failed": failed, "targets": summary.rows},
            indent=2,
            default=str,
        )
        + "\n"
    )
    if args.markdown:
        args.markdown.write_text(markdown(header, reports, summary))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def describe(header: dict[str, Any]) -> str:
    machine = header["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    features = "\n".join(f"  {k}: {v}" for k, v in header["features"].items())
    return (
        f"fastapi_dbpool benchmarks, profile {header['profile']['name']}, "
        f"{header['profile']['rounds']} rounds, library at {machine['library_revision']}\n"
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"Python {machine['python']}, PostgreSQL {machine['postgresql']} "
        f"({header['database']}), load generator {header['load_generator']}\n"
        f"packages: {packages}\nfeatures:\n{features}\n"
    )


def targets_table(reports: list[Report]) -> Table:
    table = Table("Targets of issue 5", ["comparison", "target", "goal", "measured", "verdict"])
    for report in reports:
        for target in report.targets:
            table.add(report.name, target.name, target.goal, target.measured, target.verdict)
    return table


def markdown(header: dict[str, Any], reports: list[Report], summary: Table) -> str:
    out = [describe(header).replace("\n", "  \n"), ""]
    for report in reports:
        out += [f"### {report.title}", ""]
        for table in report.tables:
            out += [table.markdown(), ""]
        out.extend(f"- {n}" for n in report.notes)
        out.append("")
    out += [summary.markdown(), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
