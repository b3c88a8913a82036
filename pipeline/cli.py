"""``rlhf``: run a pipeline file, and see how a run is doing."""

from __future__ import annotations

import argparse
import os
import sys

from jobs import store
from jobs.errors import StageError

DEFAULT_STORE = os.environ.get("KUBERLHF_STORE", "runs")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.backends.local import LocalBackend
    from pipeline.config import plan
    from pipeline.status import summary

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    print(f"run {the_plan.run_id}: {len(the_plan.stages)} stages -> {the_plan.run_uri}")
    results = LocalBackend().run(the_plan, only=args.only)
    print(f"\nrun {the_plan.run_id} finished:")
    for name, manifest in results.items():
        print(f"  {name:<10} {summary(manifest.metrics)}")
        print(f"  {'':<10} -> {manifest.config['output']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import run_status, summary

    run_uri = store.join(_root(args.store), args.run)
    for stage in run_status(run_uri):
        print(f"{stage.name:<10} {stage.state:<9} {summary(stage.metrics)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import plan

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    for stage in the_plan.stages:
        after = f" (after {', '.join(stage.needs)})" if stage.needs else ""
        print(f"{stage.name}: {stage.stage} -> {stage.output}{after}")
    return 0


def _root(store_uri: str) -> str:
    if store.is_s3(store_uri):
        return store_uri
    from pathlib import Path

    return str(Path(store_uri).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline file (finished stages are skipped)")
    run.add_argument("pipeline")
    run.add_argument("--run-id", help="default: the pipeline's run_id, else its name")
    run.add_argument("--store", help="override the pipeline's store (a path or s3:// URI)")
    run.add_argument("--backend", choices=["local"], default="local")
    run.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="the state and newest metrics of every stage of a run")
    status.add_argument("run", help="the run id")
    status.add_argument("--store", default=DEFAULT_STORE, help=f"default: {DEFAULT_STORE}")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("validate", help="check a pipeline file and print its stage order")
    check.add_argument("pipeline")
    check.add_argument("--run-id")
    check.add_argument("--store")
    check.set_defaults(func=cmd_validate)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
