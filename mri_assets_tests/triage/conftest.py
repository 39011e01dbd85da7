"""Fixtures for the triage app: a tiny slices shard, a label store with users, a live server."""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn

from mri_assets.assets.support.partitions import N_SHARDS
from mri_assets.core.manifest import image_id_for, shard_for
from mri_assets.core.wave_layout import WaveLayout, layout_key
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.triage.app import TriageSettings, create_app
from mri_assets.triage.slice_reader import SliceReader

CLASSES = ["axial_inferior", "axial_superior", "coronal", "sagittal"]
PASSWORD = "Tulip-Harbor-7-Quartz"
METRICS_TOKEN = "metrics-token-for-tests"
SECRET = "triage-tests-Xq7Lm2Vb9Rt4Kp8Nw3Zc6Hd1Jf5Gs0Ya"
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 8192}


def image_ids(n: int) -> list[str]:
    """Ids as the manifest makes them (source sha256 prefix, slice index), spread over the shards."""
    return [image_id_for(hashlib.sha256(f"volume:{i // 3}".encode()).hexdigest(), 40 + i % 3)
            for i in range(n)]


@functools.cache
def mni_axial_slices() -> np.ndarray:
    """Axial slices of the MNI152 T1 template shipped with nilearn, 256 px uint8 (N, 256, 256)."""
    import nibabel as nib
    import nilearn
    from PIL import Image

    path = (
        Path(nilearn.__file__).parent
        / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    slices = []
    for z in range(40, 160, 4):
        plane = np.rot90(volume[:, :, z])
        scaled = (255 * plane / max(float(plane.max()), 1.0)).astype(np.uint8)
        slices.append(np.asarray(Image.fromarray(scaled).resize((256, 256), Image.BILINEAR)))
    return np.stack(slices)


def write_slices_shard(root: Path, wave: str, ids: list[str]) -> None:
    """Real MNI152 slices in the `slices/{wave}/` layout, each id in the shard the manifest gives
    it; rows are stored in reverse so that an index row never equals its position."""
    folder = root / "slices" / wave
    folder.mkdir(parents=True, exist_ok=True)
    layout = root / layout_key(wave)
    layout.parent.mkdir(parents=True, exist_ok=True)
    layout.write_bytes(WaveLayout(wave, N_SHARDS).to_json())
    template = mni_axial_slices()
    by_shard: dict[int, list[int]] = {}
    for position, image_id in enumerate(ids):
        by_shard.setdefault(shard_for(image_id, N_SHARDS), []).append(position)
    for shard, positions in by_shard.items():
        pixels = np.stack([template[p % len(template)] for p in reversed(positions)])
        np.save(folder / f"shard-{shard:02d}.npy", pixels)
        rows = [len(positions) - 1 - k for k in range(len(positions))]
        pl.DataFrame({"image_id": [ids[p] for p in positions], "row": rows}).write_parquet(
            folder / f"shard-{shard:02d}.parquet"
        )


def make_store(url: str, **config) -> LabelStore:
    return LabelStore(url=url, **{**FAST_HASH, "qa_fraction": 0.0, **config})


def add_users(store: LabelStore, clinicians: list[str], admins: list[str] = ()) -> None:
    for name in clinicians:
        store.add_annotator(name, PASSWORD, "clinician")
    for name in admins:
        store.add_annotator(name, PASSWORD, "admin")


def settings(**overrides) -> TriageSettings:
    return TriageSettings(
        **{"secret_key": SECRET, "metrics_token": METRICS_TOKEN, "lease_seconds": 300, **overrides}
    )


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def log_in(client: httpx.Client, username: str, password: str = PASSWORD) -> str:
    """Log `client` in; return the session's CSRF token."""
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )
    assert response.status_code in (200, 303), response.text
    return csrf_from(client.get("/").text)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_slices_shard(root, "pilot", image_ids(12))
    return root


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'labels.db'}"


@pytest.fixture
def label_store(db_url: str) -> Iterator[LabelStore]:
    store = make_store(db_url)
    add_users(store, ["alice", "bob"], ["root"])
    store.enqueue(
        "pilot",
        [
            {"image_id": i, "priority": float(n), "prediction": "coronal"}
            for n, i in enumerate(image_ids(12))
        ],
        CLASSES,
    )
    yield store
    store.dispose()


@pytest.fixture
def reader(store_root: Path) -> SliceReader:
    return SliceReader(LocalObjectStore(root=str(store_root)))


class LiveServer:
    """uvicorn serving an app on loopback in a background thread."""

    def __init__(self, app, port: int):
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server(label_store: LabelStore, reader: SliceReader) -> Iterator[LiveServer]:
    from mri_assets_tests.services import free_port

    with LiveServer(create_app(label_store, reader, settings()), free_port()) as server:
        yield server


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser)."""
    import shutil

    from mri_assets_tests.services import require_binary

    require_binary("chromium")  # fails under CI=true, skips elsewhere
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    yield opened
    context.close()
