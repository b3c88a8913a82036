"""``rlhf``: run a pipeline file, and see how a run is doing."""

from __future__ import annotations

import argparse
import os
import sys

from jobs import store
from jobs.errors import BadInputError, StageError

DEFAULT_STORE = os.environ.get("KUBERLHF_STORE", "runs")


def check_plan(the_plan, only: list[str] | None = None) -> None:
    """What a run would otherwise find only on reaching a stage: each stage's chart values
    (a typo such as ``gpu: 1``), and the names ``--only`` gives."""
    from pipeline.charts import stage_values

    for stage in the_plan.stages:
        stage_values(the_plan, stage)
    names = [stage.name for stage in the_plan.stages]
    for name in only or []:
        if name not in names:
            raise BadInputError(
                f"--only {name}: no such stage in {the_plan.source}; its stages are "
                + ", ".join(names)
            )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.backends import get_backend
    from pipeline.config import plan
    from pipeline.status import summary

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    check_plan(the_plan, args.only)
    options = backend_options(args)
    print(
        f"run {the_plan.run_id}: {len(the_plan.stages)} stages -> {the_plan.run_uri}"
        f" ({args.backend})"
    )
    results = get_backend(args.backend, **options).run(the_plan, only=args.only)
    print(f"\nrun {the_plan.run_id} finished:")
    for name, manifest in results.items():
        print(f"  {name:<10} {summary(manifest.metrics)}")
        print(f"  {'':<10} -> {manifest.config['output']}")
    for name, manifest in results.items():
        metrics = manifest.metrics
        if "win_rate" in metrics:
            low, high = metrics["win_rate_ci95"]
            judge = {"held_out": "the held-out judge", "judge": "the judge endpoint"}.get(
                metrics.get("judged_by"), "the proxy reward model"
            )
            proxy = (
                f" (by the reward model it was optimised against: {metrics['proxy_win_rate']:.3f})"
                if metrics.get("judged_by") != "proxy" and "proxy_win_rate" in metrics
                else ""
            )
            print(
                f"\n{name}: win rate {metrics['win_rate']:.3f} (95% CI {low:.3f}-{high:.3f}) "
                f"by {judge}{proxy} "
                f"on {metrics['prompts']} held-out prompts; report and plots in "
                f"{store.join(manifest.config['output'], 'report.json')}, "
                f"{store.join(manifest.config['output'], 'plots')}/"
            )
    return 0


def backend_options(args: argparse.Namespace) -> dict:
    if args.backend == "kubernetes":
        return {"context": args.context}
    if args.backend == "container":
        return {"engine": args.engine}
    return {}


def cmd_render(args: argparse.Namespace) -> int:
    """Every manifest a kubernetes run would create, as one YAML stream."""
    import yaml

    from pipeline.charts import render_stage
    from pipeline.config import plan

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    documents = []
    for stage in the_plan.stages:
        documents += render_stage(the_plan, stage)
    print(yaml.safe_dump_all(documents, sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from pipeline.backends import get_backend, mark_cancelled
    from pipeline.config import plan

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    mark_cancelled(the_plan)  # first: an `rlhf run` about to create a Job sees it
    deleted = get_backend(args.backend, **backend_options(args)).delete(the_plan)
    what = "Jobs (with their pods)" if args.backend == "kubernetes" else "containers"
    print(f"run {the_plan.run_id}: deleted {deleted} {what}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import run_status

    run_uri = store.join(_root(args.store), args.run)
    for stage in run_status(run_uri):
        print(f"{stage.name:<10} {stage.state:<9} {stage.line()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.report import write_report

    run_uri = store.join(_root(args.store), args.run)
    if args.out:
        page = Path(args.out)
    elif store.is_s3(run_uri):
        page = Path(f"{args.run}-report.html")
    else:
        page = store.local_path(store.join(run_uri, "report.html"))
    write_report(run_uri, page)
    print(f"report of run {args.run}: {page.resolve()}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import plan

    the_plan = plan(args.pipeline, run_id=args.run_id, store_uri=args.store)
    check_plan(the_plan)
    for stage in the_plan.stages:
        after = f" (after {', '.join(stage.needs)})" if stage.needs else ""
        print(f"{stage.name}: {stage.stage} -> {stage.output}{after}")
    return 0


def _root(store_uri: str) -> str:
    if store.is_s3(store_uri):
        return store_uri
    from pathlib import Path

    return str(Path(store_uri).resolve())


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="the pipeline file")
    parser.add_argument("--run-id", help="default: the pipeline's run_id, else its name")
    parser.add_argument("--store", help="override the pipeline's store (a path or s3:// URI)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline file (finished stages are skipped)")
    add_plan_arguments(run)
    run.add_argument("--backend", choices=["local", "container", "kubernetes"], default="local")
    run.add_argument("--context", help="kubeconfig context (kubernetes backend)")
    run.add_argument("--engine", help="podman or docker (container backend; default: found)")
    run.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages")
    run.set_defaults(func=cmd_run)

    render = sub.add_parser("render", help="print every manifest a kubernetes run would create")
    add_plan_arguments(render)
    render.set_defaults(func=cmd_render)

    cancel = sub.add_parser("cancel", help="delete a run's Jobs and pods (or containers)")
    add_plan_arguments(cancel)
    cancel.add_argument("--backend", choices=["container", "kubernetes"], default="kubernetes")
    cancel.add_argument("--context", help="kubeconfig context")
    cancel.add_argument("--engine", help="podman or docker (container backend)")
    cancel.set_defaults(func=cmd_cancel)

    status = sub.add_parser("status", help="the state and newest metrics of every stage of a run")
    status.add_argument("run", help="the run id")
    status.add_argument("--store", default=DEFAULT_STORE, help=f"default: {DEFAULT_STORE}")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write one self-contained HTML page about a run")
    report.add_argument("run", help="the run id")
    report.add_argument("--store", default=DEFAULT_STORE, help=f"default: {DEFAULT_STORE}")
    report.add_argument(
        "--out", help="the page to write (default: report.html in a local run's folder)"
    )
    report.set_defaults(func=cmd_report)

    check = sub.add_parser("validate", help="check a pipeline file and print its stage order")
    add_plan_arguments(check)
    check.set_defaults(func=cmd_validate)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a stage started stays as it is: `rlhf status` shows it
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
