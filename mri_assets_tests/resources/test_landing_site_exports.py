"""Files as sites export them, landed and decoded: pairs listed as one object, partners missing,
non-images, a gzip bomb and identifying metadata withheld or cleaned, and the counts of every
case reconciling (listed = ok + duplicate + quarantined)."""

import polars as pl
import pytest

from mri_assets.core.deid import read_withheld
from mri_assets.core.ingest import DecodeSettings, SourceObject, decode_source, rows_frame
from mri_assets.core.manifest import ManifestSettings, finish_manifest, reconcile
from mri_assets.resources.landing import land_wave, landed_objects
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets_tests.core.site_exports import (
    PLANTED_BIRTH,
    PLANTED_ID,
    PLANTED_NAME,
    write_site_exports,
)

WAVE = "sites"
BOUND = 64 * 2**20  # the gzip bound, lowered so the bomb's test stays small


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    cases = write_site_exports(root / "src")
    store = LocalObjectStore(root=str(root / "store"))
    report = land_wave(LocalObjectStore(root=str(root / "src")), "", store, WAVE, "salt",
                       max_unpacked_bytes=BOUND)
    listing = landed_objects(store, WAVE)
    settings = DecodeSettings(wave=WAVE, n_shards=4)
    rows = []
    for key, size, sha in listing.iter_rows():
        source = SourceObject(key, data=store.get_bytes(key), size=size, expected_sha256=sha)
        rows += decode_source(source, settings)[0]
    manifest = finish_manifest(rows_frame(rows), ManifestSettings(salt="salt", n_shards=4))
    return cases, store, report, listing, manifest


def test_pairs_are_listed_as_one_object_under_the_headers_name(landed):
    cases, _, report, listing, _ = landed
    assert sorted(listing["key"]) == sorted(f"raw/{WAVE}/{case.key}" for case in cases)
    assert report.listed == len(cases)
    for partner in ("analyze/anatomical.img", "parrec/phantom_EPI_asc_CLEAR_2_1.REC",
                    "afni/example4d+orig.BRIK.gz", "niftipair/anatomical.img"):
        assert f"raw/{WAVE}/{partner}" not in set(listing["key"])


def test_every_case_gives_its_slices_or_its_reason_and_the_counts_reconcile(landed):
    cases, _, _, listing, manifest = landed
    check = reconcile(listing["key"].to_list(), manifest)
    assert check.passed, check.describe()
    assert check.rows == check.ok + check.duplicate + check.quarantined
    for case in cases:
        rows = manifest.filter(pl.col("source_key") == f"raw/{WAVE}/{case.key}")
        ok = rows.filter(pl.col("status") == "ok").height
        quarantined = rows.filter(pl.col("status") == "quarantined")
        if case.ok_slices is not None:
            assert (ok, quarantined.height) == (case.ok_slices, 0), (case.key, quarantined["reason"].to_list()[:1])
        else:
            assert ok == 0, case.key
            assert quarantined.height == max(1, case.quarantined_slices), case.key
            assert all(case.reason in reason.lower() for reason in quarantined["reason"]), \
                (case.key, quarantined["reason"][0])


def test_no_planted_identifier_reaches_the_store(landed):
    _, store, _, listing, _ = landed
    for key in listing["key"]:
        stored = store.get_bytes(key)
        for value in (PLANTED_NAME, PLANTED_ID, PLANTED_BIRTH, "Konvertertest", "2014.02.14"):
            assert value.encode() not in stored, (key, value)


def test_the_png_text_name_is_gone_and_withheld_objects_keep_only_their_hash(landed):
    _, store, _, _, _ = landed
    png = store.get_bytes(f"raw/{WAVE}/viewer/slice.png")
    assert png.startswith(b"\x89PNG") and b"tEXt" not in png and PLANTED_NAME.encode() not in png
    for key in ("gz/bomb.dcm.gz", "tracts/simple.trk", "alone/analyze.hdr"):
        assert read_withheld(store.get_bytes(f"raw/{WAVE}/{key}")) is not None, key


def test_minc2_lands_rebuilt_without_its_header_text(landed):
    _, store, _, _, _ = landed
    for key in ("minc2/anatomical.mnc", "minc2/minc2_4d.mnc"):
        stored = store.get_bytes(f"raw/{WAVE}/{key}")
        assert read_withheld(stored) is None, key
        assert stored.startswith(b"\x89HDF\r\n\x1a\n"), key
        for text in (b"history", b"ident", b"info", b"patient", b"rawtominc"):
            assert text not in stored, (key, text)


def test_landing_the_same_exports_again_copies_nothing(landed, tmp_path):
    cases, store, _, listing, _ = landed
    source = tmp_path / "again"
    write_site_exports(source)
    again = land_wave(LocalObjectStore(root=str(source)), "", store, WAVE, "salt",
                      max_unpacked_bytes=BOUND)
    assert (again.copied, again.skipped_same_checksum) == (0, len(cases))
    assert landed_objects(store, WAVE).equals(listing)
