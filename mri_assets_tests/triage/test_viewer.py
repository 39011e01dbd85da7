"""The viewer: the slice at its original resolution and 16-bit values from the raw NIfTI the
manifest points to, orientation markers from its affine, the 256 px PNG as the fallback, class
examples; in chromium, window/level on the real values changes the rendered pixels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import expect

from mri_assets.core.manifest import MANIFEST_SCHEMA, image_id_for
from mri_assets.core.slice_shards import manifest_key
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.triage.app import create_app
from mri_assets.triage.raw_slices import RawSliceReader
from mri_assets.triage.slice_reader import SliceReader
from mri_assets_tests.triage.conftest import (
    CLASSES,
    write_slices_shard,
)
from mri_assets_tests.triage.conftest import (
    settings as app_settings,
)
from mri_assets_tests.triage.test_browser import log_in, wait_until_idle
from mri_assets_tests.triage.test_dead_ends import logged_in

WAVE = "raw16"
SLICES = (60, 90, 120)


def mni_volume_16bit() -> nib.Nifti1Image:
    import nilearn

    path = (
        Path(nilearn.__file__).parent
        / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    template = nib.load(path)
    values = np.asarray(template.dataobj, dtype=np.float32)
    scaled = np.round(values / values.max() * 3000 + 200 * (values > 0)).astype(np.int16)
    return nib.Nifti1Image(scaled, template.affine)


def write_raw_wave(root: Path) -> list[str]:
    """A 16-bit NIfTI volume under raw/, a manifest naming three of its slices, and their
    256 px slices (the fallback)."""
    data = mni_volume_16bit().to_bytes()
    key = f"raw/{WAVE}/mni16.nii"
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    ids = [image_id_for(sha, z) for z in SLICES]
    rows = {name: [None] * len(ids) for name in MANIFEST_SCHEMA}
    rows.update(image_id=ids, wave=[WAVE] * 3, source_key=[key] * 3, sha256=[sha] * 3,
                slice_index=list(SLICES), format=["nifti"] * 3, status=["ok"] * 3)
    manifest = root / manifest_key(WAVE)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=MANIFEST_SCHEMA).write_parquet(manifest)
    write_slices_shard(root, WAVE, ids)
    return ids


@pytest.fixture
def raw_wave(store_root, label_store):
    ids = write_raw_wave(store_root)
    label_store.enqueue(WAVE, [{"image_id": i, "priority": 1e6 + n} for n, i in enumerate(ids)],
                        CLASSES)
    return ids


def test_the_raw_reader_gives_the_original_values_and_markers(store_root, raw_wave):
    reader = RawSliceReader(LocalObjectStore(root=str(store_root)))
    raw = reader(WAVE, raw_wave[1])
    volume = np.asarray(mni_volume_16bit().dataobj)
    expected = volume[:, :, SLICES[1]].T[::-1]
    assert raw.values.shape == expected.shape == (233, 197)
    assert np.array_equal(raw.values, expected.astype(np.float32))
    assert raw.values.max() > 255, "16-bit values, not the windowed 8-bit slice"
    assert raw.orientation == {"top": "A", "bottom": "P", "left": "L", "right": "R"}
    body, headers = raw.encode()
    assert len(body) == 4 * 233 * 197 and headers["X-Slice-Orientation"] == "top=A,bottom=P,left=L,right=R"


def test_the_raw_route_and_the_png_fallback(label_store, reader, raw_wave, store_root):
    app = create_app(label_store, reader, app_settings())
    alice, _ = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    assert item["raw_url"] == f"/image/{item['id']}.raw"
    raw = alice.get(item["raw_url"])
    assert raw.status_code == 200 and raw.headers["x-slice-width"] == "197"
    assert float(raw.headers["x-slice-max"]) > 255
    assert alice.get(item["image_url"]).status_code == 200
    bob = TestClient(app)
    assert bob.get(item["raw_url"]).status_code == 401
    (store_root / f"raw/{WAVE}/mni16.nii").write_bytes(b"changed")
    fresh = create_app(label_store, SliceReader(LocalObjectStore(root=str(store_root))),
                       app_settings())
    again, _ = logged_in(fresh, "alice")
    gone = again.get(item["raw_url"])
    assert gone.status_code == 404 and gone.json()["error"] == "NoRawSlice"
    assert again.get(item["image_url"]).status_code == 200, "the 256 px slice stays the fallback"


def test_class_examples_come_from_labelled_slices(label_store, reader):
    app = create_app(label_store, reader, app_settings())
    alice, csrf = logged_in(app, "alice")
    assert alice.get("/api/example.png?label=coronal").status_code == 404
    item = alice.get("/api/next").json()["item"]
    alice.post("/api/label", json={"item_id": item["id"], "label": "coronal"},
               headers={"X-CSRF-Token": csrf})
    example = alice.get("/api/example.png?label=coronal")
    assert example.status_code == 200 and example.headers["content-type"] == "image/png"


RENDERED = """() => {
  const c = document.getElementById('slice');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sum = 0, lit = 0;
  for (let i = 0; i < d.length; i += 4) { sum += d[i]; if (d[i] > 0) { lit += 1; } }
  return [sum, lit];
}"""


@pytest.mark.integration
def test_window_level_on_16_bit_values_changes_the_rendered_pixels(page, live_server, raw_wave):
    log_in(page, live_server.url, "alice")
    wait_until_idle(page)
    canvas = page.locator("#slice")
    expect(canvas).to_have_attribute("data-source", "raw")
    assert int(canvas.get_attribute("data-window")) > 255, "the window is in the file's units"
    expect(page.locator("#marker-top")).to_have_text("A")
    expect(page.locator("#marker-right")).to_have_text("R")
    expect(page.locator("#source-info")).to_contain_text("197 × 233 px, original values (nifti)")
    before = page.evaluate(RENDERED)
    for _ in range(6):
        page.keyboard.press("ArrowLeft")  # a narrower window
    page.keyboard.press("ArrowUp")
    after = page.evaluate(RENDERED)
    assert after != before
    page.keyboard.press("f")
    full = page.evaluate(RENDERED)
    assert full != after
    assert canvas.get_attribute("data-preset") == "full"
    page.screenshot(path=str(Path(__file__).resolve().parents[2] / "test-artifacts" /
                             "triage-viewer-16bit.png"))


def write_raw_object(root: Path, name: str, data: bytes, fmt: str) -> str:
    """One raw object under raw/{WAVE}/ and a manifest naming its slice 0; its image id."""
    key = f"raw/{WAVE}/{name}"
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    rows = {column: [None] for column in MANIFEST_SCHEMA}
    rows.update(image_id=[image_id_for(sha, 0)], wave=[WAVE], source_key=[key], sha256=[sha],
                slice_index=[0], format=[fmt], status=["ok"])
    manifest = root / manifest_key(WAVE)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=MANIFEST_SCHEMA).write_parquet(manifest)
    return rows["image_id"][0]


def test_a_gzip_packed_dicom_object_is_read_like_ingest_reads_it(store_root):
    """Landing stores .gz objects packed again after de-identification: the viewer unpacks
    them within ingest's bound and reads the markers from the unpacked header."""
    import gzip

    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    image_id = write_raw_object(store_root, "mr_small.dcm.gz",
                                gzip.compress(Path(path).read_bytes(), mtime=0), "dicom")
    raw = RawSliceReader(LocalObjectStore(root=str(store_root)))(WAVE, image_id)
    expected = pydicom.dcmread(path).pixel_array.astype(np.float32)
    assert np.array_equal(raw.values, expected)
    # Image Orientation (Patient) 1,0,0 / 0,1,0: rows run to the patient's left, columns back.
    assert raw.orientation == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
