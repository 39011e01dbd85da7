"""The `mri-assets` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mri_assets.core.home import MriHome


def _home(args: argparse.Namespace) -> MriHome:
    if getattr(args, "home", None):
        os.environ["MRI_ASSETS_HOME"] = str(Path(args.home).resolve())
    return MriHome.from_env().ensure()


def _defs():
    from mri_assets.definitions import build_defs

    return build_defs()


def cmd_sample_data(args: argparse.Namespace) -> int:
    from mri_assets.core.sample_data import build_sample_data

    summary = build_sample_data(
        Path(args.out), n_slices=args.slices, seed=args.seed, wave_style=args.wave_style,
        include_bad=not args.no_bad, progress=True,
    )
    print(summary)
    return 0


def _ingest(home: MriHome, wave: str, source: str) -> str:
    from mri_assets.core.manifest import validate_wave_key
    from mri_assets.local_run import dagster_instance
    from mri_assets.partitions import WAVES
    from mri_assets.resources.landing import land_wave
    from mri_assets.resources.object_store import store_from_uri

    validate_wave_key(wave)
    defs = _defs()
    store = defs.resources["object_store"]
    salt = defs.resources["ingest"].salt
    salt = salt.get_value() if hasattr(salt, "get_value") else salt
    source_store = store_from_uri(source, cache_dir=str(home.cache))
    with tqdm(desc=f"landing {wave}", unit="file") as bar:
        report = land_wave(source_store, "", store, wave, salt, on_file=bar.update)
    instance = dagster_instance(home)
    if not instance.has_dynamic_partition(WAVES, wave):
        instance.add_dynamic_partitions(WAVES, [wave])
    return report.describe()


def cmd_ingest_wave(args: argparse.Namespace) -> int:
    print(_ingest(_home(args), args.wave, args.source))
    return 0


def _run_wave(home: MriHome, wave: str, selection: str | None) -> bool:
    from mri_assets.local_run import dagster_instance, materialize_wave

    defs = _defs()
    instance = dagster_instance(home)
    with tqdm(desc=f"materializing {wave}", unit="step") as bar:
        report = materialize_wave(defs, instance, wave, selection, on_step=lambda _: bar.update())
    if not report.success:
        print(f"wave {wave}: failed at {report.failed}; see the run in `make dev` "
              f"(run ids: {report.runs[-1:]})", file=sys.stderr)
    return report.success


def cmd_run(args: argparse.Namespace) -> int:
    return 0 if _run_wave(_home(args), args.wave, args.select) else 1


def label_from_csv(home: MriHome, wave: str, labels_csv: Path, limit: int | None = None):
    import io

    import polars as pl

    from mri_assets.core.sample_labels import ground_truth_for_wave
    from mri_assets.core.slice_shards import manifest_key
    from mri_assets.simulated_clinician import label_queue_from_truth

    defs = _defs()
    store = defs.resources["object_store"]
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))))
    truth = ground_truth_for_wave(Path(labels_csv), manifest, wave)
    password = os.environ.get("MRI_ASSETS_SIMULATED_PASSWORD", "simulated-clinician-password")
    with tqdm(desc=f"simulated clinician labeling {wave}", unit="label") as bar:
        return label_queue_from_truth(defs.resources["label_store"], truth, password, limit,
                                      on_item=bar.update)


def cmd_label_from_csv(args: argparse.Namespace) -> int:
    result = label_from_csv(_home(args), args.wave, Path(args.labels), args.limit)
    print(f"simulated clinician: {result.labeled} labels, {result.qa_labeled} QA re-reads, "
          f"{result.skipped_without_truth} skipped (no ground truth)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mri_assets.demo import run_demo

    return run_demo(_home(args), slices=args.slices, seed=args.seed)


def cmd_smoke(args: argparse.Namespace) -> int:
    import json

    from mri_assets.local_run import dagster_instance
    from mri_assets.smoke_run import run_smoke

    home = _home(args)
    kwargs = {"reference_dir": Path(args.reference_dir)} if args.reference_dir else {}
    report = run_smoke(_defs(), dagster_instance(home), home, update_reference=args.update_reference,
                       n_slices=args.slices, check_only=args.check_only, **kwargs)
    print(f"smoke: {'PASS' if report.passed else 'FAIL'} in {report.seconds:.1f} s: {report.detail}")
    if report.metadata.get("mismatches"):
        print(json.dumps(report.metadata["mismatches"], indent=1))
    return 0 if report.passed else 1


def cmd_triage_serve(args: argparse.Namespace) -> int:
    from mri_assets.triage.app import serve

    _home(args)
    serve(args.host, args.port)
    return 0


def cmd_triage_add_user(args: argparse.Namespace) -> int:
    import getpass

    from mri_assets.triage.app import add_user

    _home(args)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    add_user(args.username, password, args.role)
    print(f"annotator {args.username!r} ({args.role}) added")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from mri_assets.workers import start_worker

    home = _home(args)
    start_worker(args.queue, home.dagster / "celery" / args.queue, name=args.name,
                 concurrency=args.concurrency, pool=args.pool, loglevel=args.loglevel)
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
    sample.add_argument("--wave-style", choices=["t1", "epi", "mixed"], default="t1")
    sample.add_argument("--no-bad", action="store_true", help="leave out the broken files")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        code = args.func(args)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command in ("demo", "run", "ingest-wave", "smoke"):
        print(f"({time.perf_counter() - started:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
