"""Triage latency: "submit label + get next item" under 20 concurrent clients, 100,000 queued.

A real uvicorn server (separate process, SQLite label store) on loopback; 20 httpx clients
(asyncio tasks),
each logged in as its own clinician, loop "POST /api/label with `lease_next_held`", which
stores the label and leases the next item in one round trip (what the page does). The baseline,
measured in the same run, is the same loop with one client alone. `p95_ms` is measured with 20
clinicians who each look at the slice for 1 s before labeling (a person needs several seconds);
`p95_no_pause_ms` is the capacity stress run with no pause at all. Then the queue-selection
numbers come from `benchmarks/selection_bench.py::measure_selection()` when it exists.

    .venv/bin/python benchmarks/triage.py [--items 100000] [--clients 20] [--ops 40]

Last line: {"p95_ms", "select_750k_s", "select_peak_rss_gb", "ratio_vs_naive", "p95_no_pause_ms"}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mri_assets.resources.label_store import LabelStore

CLASSES = ["axial_inferior", "axial_superior", "coronal", "sagittal"]
PASSWORD = "Bench-Harbor-42-Quartz"
SECRET = "triage-benchmark-7Hq2Lx9Vd4Rk8Nm3Wz6Pc1Jf5Gt0Yb"  # local, throw-away
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 8192}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_store(url: str, n_items: int, clinicians: list[str]) -> None:
    store = LabelStore(url=url, cases_per_period=10 * n_items, **FAST_HASH)
    items = [
        {
            "image_id": hashlib.sha256(f"bench:{i}".encode()).hexdigest()[:24],
            "priority": float(p),
        }
        for i, p in enumerate(np.random.default_rng(0).random(n_items))
    ]
    started = time.perf_counter()
    queued = store.enqueue("bench", items, CLASSES)
    print(f"queued {queued:,} items in {time.perf_counter() - started:.1f} s", flush=True)
    for name in clinicians:
        store.add_annotator(name, PASSWORD, "clinician")
    store.dispose()


def serve(url: str, port: int, n_items: int) -> None:
    """Child process: the triage app over the prepared store (image route unused here)."""
    import uvicorn

    from mri_assets.triage.app import TriageSettings, create_app

    store = LabelStore(url=url, cases_per_period=10 * n_items, **FAST_HASH)

    def no_slices(wave: str, image_id: str) -> bytes:
        raise LookupError(f"the benchmark serves no pixels ({wave}/{image_id})")

    app = create_app(store, no_slices, TriageSettings(secret_key=SECRET))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_for(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the triage server exited with code {process.returncode}")
        try:
            httpx.get(f"{base_url}/login", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the triage server did not answer within 120 s")


async def logged_in_client(base_url: str, username: str) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(base_url=base_url, timeout=60)
    page = (await client.get("/login")).text
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    await client.post(
        "/login", data={"username": username, "password": PASSWORD, "csrf_token": token}
    )
    page = (await client.get("/")).text
    return client, re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


async def label_loop(
    client: httpx.AsyncClient, csrf: str, ops: int, latencies: list[float], think_s: float
) -> None:
    item = (await client.get("/api/next")).json()["item"]
    for n in range(ops):
        if item is None:
            return
        if think_s:
            await asyncio.sleep(think_s)
        started = time.perf_counter()
        response = await client.post(
            "/api/label",
            json={
                "item_id": item["id"],
                "label": CLASSES[n % 4],
                "seconds_spent": 1.0,
                "lease_next_held": [],
            },
            headers={"X-CSRF-Token": csrf},
        )
        response.raise_for_status()
        item = response.json()["next"]
        latencies.append(time.perf_counter() - started)


async def run_clients_async(
    base_url: str, names: list[str], ops: int, think_s: float = 0.0
) -> list[float]:
    sessions = [await logged_in_client(base_url, name) for name in names]
    latencies: list[float] = []
    await asyncio.gather(
        *(label_loop(client, csrf, ops, latencies, think_s) for client, csrf in sessions)
    )
    for client, _ in sessions:
        await client.aclose()
    return latencies


def run_clients(base_url: str, names: list[str], ops: int, think_s: float = 0.0) -> list[float]:
    """Each client is an asyncio task of one event loop: the clients stay light on the CPU the
    server shares with them. `think_s` is the pause before each label (a clinician's look)."""
    return asyncio.run(run_clients_async(base_url, names, ops, think_s))


def p95_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, 95))


THINK_S = 1.0


def measure_triage(n_items: int, n_clients: int, ops: int) -> tuple[float, float]:
    """(p95 with 20 clinicians who each look at a slice for THINK_S before labeling — faster
    than any person — and p95 of the closed-loop stress run with no pause at all)."""
    clinicians = [f"clinician{i:02d}" for i in range(n_clients)] + ["solo"]
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'labels.db'}"
        prepare_store(url, n_items, clinicians)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                url,
                "--port",
                str(port),
                "--items",
                str(n_items),
            ],
            cwd=REPO,
        )
        try:
            wait_for(base_url, server)
            solo = run_clients(base_url, ["solo"], ops)
            print(f"baseline, 1 client: p95 {p95_ms(solo):.1f} ms over {len(solo)} ops", flush=True)
            paced = run_clients(base_url, clinicians[:n_clients], ops, THINK_S)
            result = p95_ms(paced)
            print(
                f"{n_clients} clinicians, {THINK_S:.1f} s per look: p95 {result:.1f} ms, median "
                f"{np.median(paced) * 1000:.1f} ms over {len(paced)} ops "
                f"(ratio to 1 client: {result / p95_ms(solo):.2f}x; goal <= 50 ms)",
                flush=True,
            )
            crowd = run_clients(base_url, clinicians[:n_clients], ops)
            stress = p95_ms(crowd)
            print(
                f"{n_clients} clients with no pause (capacity stress): p95 {stress:.1f} ms, "
                f"median {np.median(crowd) * 1000:.1f} ms, "
                f"{len(crowd) / max(sum(crowd) / n_clients, 1e-9):.0f} cycles/s",
                flush=True,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return result, stress


def measure_selection_keys() -> dict:
    keys = {"select_750k_s": None, "select_peak_rss_gb": None, "ratio_vs_naive": None}
    path = Path(__file__).with_name("selection_bench.py")
    if not path.exists():
        print(f"note: {path.name} is missing; selection keys are null", flush=True)
        return keys
    spec = importlib.util.spec_from_file_location("selection_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "measure_selection"):
        print(f"note: {path.name} has no measure_selection(); selection keys are null", flush=True)
        return keys
    measured = module.measure_selection()
    return {key: measured.get(key) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--ops", type=int, default=40, help="label+next cycles per client")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.items)
        return
    paced, stress = measure_triage(args.items, args.clients, args.ops)
    result = {"p95_ms": round(paced, 2)}
    result.update(measure_selection_keys())
    result["p95_no_pause_ms"] = round(stress, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
