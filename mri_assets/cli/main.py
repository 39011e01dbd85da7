"""The `mri-assets` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mri_assets.core.progress import Progress, terminal_bars
from mri_assets.deployment import Deployment

# Commands a person watches: they draw progress bars on the terminal and print no DEBUG lines.
WATCHED_COMMANDS = ("demo", "run", "ingest-wave", "label-from-csv", "smoke", "sample-data")


def _deployment(args: argparse.Namespace) -> Deployment:
    """The edge of every command: the deployment of this environment (`--home` overrides
    MRI_ASSETS_HOME), read once and handed to everything the command does."""
    home = Path(args.home) if getattr(args, "home", None) else None
    deployment = Deployment.from_env(home=home)
    deployment.home.ensure()
    return deployment


def cmd_sample_data(args: argparse.Namespace) -> int:
    from mri_assets.core.sample_data import build_sample_data

    summary = build_sample_data(
        Path(args.out), n_slices=args.slices, seed=args.seed, wave_style=args.wave_style,
        include_bad=not args.no_bad, progress=True, levels=args.levels,
    )
    print(summary.describe())
    return 0


def cmd_ingest_wave(args: argparse.Namespace) -> int:
    from mri_assets.cli.operations import ingest_wave

    deployment = _deployment(args)
    with Progress(f"landing {args.wave}", "files", leave=True) as bar:
        landed = ingest_wave(deployment, args.wave, args.source, on_file=bar.advance)
    print(landed)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mri_assets.cli.operations import run_wave

    report = run_wave(_deployment(args), args.wave, args.select)  # a bar per stage (local_run)
    if report.interrupted:
        print(f"wave {args.wave}: stopped by {report.interrupted}; the same command runs the "
              f"selection again (run ids: {report.runs[-1:]})", file=sys.stderr)
    elif not report.success:
        print(f"wave {args.wave}: failed at {report.failed}; see the run in `make dev` "
              f"(run ids: {report.runs[-1:]})", file=sys.stderr)
    return report.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from mri_assets.definitions.wave_status import print_waits

    return print_waits(_deployment(args).home, args.wave)


def cmd_label_from_csv(args: argparse.Namespace) -> int:
    from mri_assets.cli.operations import label_from_csv

    deployment = _deployment(args)
    with Progress(f"simulated clinician labeling {args.wave}", "labels", leave=True) as bar:
        result = label_from_csv(deployment, args.wave, Path(args.labels), args.limit,
                                on_item=bar.advance)
    print(f"simulated clinician: {result.labeled} labels, {result.qa_labeled} QA re-reads, "
          f"{result.skipped_without_truth} skipped (no ground truth)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mri_assets.cli.demo import run_demo

    return run_demo(_deployment(args), slices=args.slices, seed=args.seed)


def cmd_smoke(args: argparse.Namespace) -> int:
    import json

    from mri_assets.definitions import build_defs
    from mri_assets.definitions.local_run import dagster_instance
    from mri_assets.definitions.smoke_run import run_smoke

    deployment = _deployment(args)
    kwargs = {"reference_dir": Path(args.reference_dir)} if args.reference_dir else {}
    report = run_smoke(build_defs(deployment), dagster_instance(deployment.home), deployment.home,
                       update_reference=args.update_reference, n_slices=args.slices,
                       check_only=args.check_only, **kwargs)
    print(f"smoke: {'PASS' if report.passed else 'FAIL'} in {report.seconds:.1f} s: {report.detail}")
    if report.metadata.get("mismatches"):
        print(json.dumps(report.metadata["mismatches"], indent=1))
    return 0 if report.passed else 1


def cmd_triage_serve(args: argparse.Namespace) -> int:
    from mri_assets.triage.app import serve

    serve(_deployment(args), args.host, args.port)
    return 0


def cmd_triage_add_user(args: argparse.Namespace) -> int:
    import getpass

    from mri_assets.triage.app import add_user

    deployment = _deployment(args)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    add_user(deployment, args.username, password, args.role)
    print(f"annotator {args.username!r} ({args.role}) added")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from mri_assets.cli.workers import start_worker

    deployment = _deployment(args)
    start_worker(deployment, args.queue, deployment.home.dagster / "celery" / args.queue,
                 name=args.name, concurrency=args.concurrency, pool=args.pool,
                 loglevel=args.loglevel)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mri-assets", description=__doc__)
    parser.add_argument("--home", help="state folder (default: $MRI_ASSETS_HOME or ./.mri_assets)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample data -> pilot wave -> every asset, with a summary")
    demo.add_argument("--slices", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    sample = sub.add_parser("sample-data", help="write a landing folder built from real scans")
    sample.add_argument("--out", required=True)
    sample.add_argument("--slices", type=int, default=2000)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--wave-style", choices=["t1", "epi", "mixed", "t1_new_site"],
                        default="t1")
    sample.add_argument("--no-bad", action="store_true", help="leave out the broken files")
    sample.add_argument("--levels", action="store_true",
                        help="add labels.csv column `level`: the harder class set (anatomical levels)")
    sample.set_defaults(func=cmd_sample_data)

    ingest = sub.add_parser("ingest-wave", help="land a folder or S3 prefix as raw/WAVE/ and register it")
    ingest.add_argument("wave")
    ingest.add_argument("--source", required=True, help="a folder, file:// or s3://bucket/prefix")
    ingest.set_defaults(func=cmd_ingest_wave)

    simulated = sub.add_parser(
        "label-from-csv",
        help="SIMULATED clinician for demos: label the queued items of WAVE from a ground-truth CSV",
    )
    simulated.add_argument("wave")
    simulated.add_argument("--labels", required=True, help="labels.csv written by sample-data")
    simulated.add_argument("--limit", type=int, help="stop after this many labels")
    simulated.set_defaults(func=cmd_label_from_csv)

    run = sub.add_parser("run", help="materialize a wave in this process")
    run.add_argument("wave")
    run.add_argument("--select", help="Dagster asset selection, e.g. 'manifest slices'")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="what each unfinished run waits for (a pool, the run "
                            "limit) or that it runs")
    status.add_argument("wave", nargs="?", default=None, help="only this wave's runs")
    status.set_defaults(func=cmd_status)

    worker = sub.add_parser("worker", help="a dagster-celery worker for the celery profile "
                            "(env MRI_ASSETS_CELERY_BROKER, default redis://127.0.0.1:6379/0)")
    worker.add_argument("--queue", choices=["gpu", "default"], required=True,
                        help="gpu: steps tagged dagster-celery/queue=gpu; default: every other step")
    worker.add_argument("--name", help="worker name before @host (default: the queue)")
    worker.add_argument("--concurrency", type=int, default=1, help="steps run at once")
    worker.add_argument("--pool", choices=["prefork", "solo", "threads"], default="prefork")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    smoke = sub.add_parser("smoke", help="the nightly reproducibility run on the fixed smoke wave")
    smoke.add_argument("--update-reference", action="store_true",
                       help="rewrite the committed reference (mri_assets/smoke/) from this run")
    smoke.add_argument("--check-only", action="store_true",
                       help="compare what the store holds now, without re-running the wave")
    smoke.add_argument("--slices", type=int, default=1000, help="sample size (the reference: 1000)")
    smoke.add_argument("--reference-dir", help="reference folder (default: mri_assets/smoke/)")
    smoke.set_defaults(func=cmd_smoke)

    triage = sub.add_parser("triage", help="the clinicians' labeling web app").add_subparsers(
        dest="triage_command", required=True
    )
    serve = triage.add_parser("serve", help="run the triage app (env MRI_ASSETS_TRIAGE_SECRET, "
                              "MRI_ASSETS_METRICS_TOKEN)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.set_defaults(func=cmd_triage_serve)
    add_user = triage.add_parser("add-user", help="create a clinician or admin account")
    add_user.add_argument("username")
    add_user.add_argument("--role", choices=["clinician", "admin"], default="clinician")
    add_user.add_argument("--password-stdin", action="store_true",
                          help="read the password from stdin instead of prompting")
    add_user.set_defaults(func=cmd_triage_add_user)
    return parser


@contextmanager
def _watched(command: str) -> Iterator[None]:
    """A command a person watches: progress bars on this terminal, no DEBUG lines (a worker's or
    the triage server's output is a log, and stays one)."""
    if command not in WATCHED_COMMANDS:
        yield
        return
    from mri_assets.definitions.local_run import without_debug_lines

    with terminal_bars(), without_debug_lines():
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        with _watched(args.command):
            code = args.func(args)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command in ("demo", "run", "ingest-wave", "smoke"):
        print(f"({time.perf_counter() - started:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
