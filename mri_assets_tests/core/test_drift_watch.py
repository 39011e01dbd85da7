"""The drift sensor's memory: the baseline restarts when the backbone changes."""

from mri_assets.core.drift_watch import ClustersObservation, DriftWatch

SSL = "resnet18:ssl:aaaaaaaaaaaa@128"
OTHER = "resnet18:ssl:bbbbbbbbbbbb@128"


def _seen(storage_id: int, wave: str, ari: float | None, model_id: str = SSL) -> ClustersObservation:
    return ClustersObservation(storage_id=storage_id, wave=wave, model_id=model_id, k=4, ari=ari)


def test_a_new_backbone_restarts_the_baseline_and_later_waves_compare_with_it():
    watch = DriftWatch()
    assert watch.observe(_seen(1, "pilot", 0.60), 0.10, None)[0].status == "baseline"
    decision, run_key = watch.observe(_seen(2, "scale", 0.20, OTHER), 0.10, None)
    assert (decision.status, run_key) == ("baseline", None)
    assert "backbone changed" in decision.reason and "restarts" in decision.reason
    assert (watch.baseline.wave, watch.baseline.model_id) == ("scale", OTHER)
    decision, run_key = watch.observe(_seen(3, "full-1", 0.10, OTHER), 0.10, None)
    assert decision.drifted and run_key == "ari-drift:full-1:1"


def test_the_same_backbone_keeps_the_baseline_and_detects_drift():
    watch = DriftWatch()
    watch.observe(_seen(1, "pilot", 0.60), 0.10, None)
    decision, run_key = watch.observe(_seen(2, "scale", 0.30), 0.10, None)
    assert decision.drifted and run_key == "ari-drift:scale:1"
    assert watch.baseline.wave == "pilot"


def test_a_pinned_baseline_never_restarts_and_refuses_other_backbones():
    watch = DriftWatch()
    watch.observe(_seen(1, "pilot", 0.60), 0.10, "pilot")
    decision, run_key = watch.observe(_seen(2, "scale", 0.20, OTHER), 0.10, "pilot")
    assert (decision.status, run_key) == ("refused", None)
    assert watch.baseline.wave == "pilot" and watch.baseline.model_id == SSL


def test_the_restarted_baseline_survives_the_cursor():
    watch = DriftWatch()
    watch.observe(_seen(1, "pilot", 0.60), 0.10, None)
    watch.observe(_seen(2, "scale", 0.50, OTHER), 0.10, None)
    again = DriftWatch.from_cursor(watch.to_cursor())
    assert (again.baseline.wave, again.baseline.model_id, again.after_storage_id) == ("scale", OTHER, 2)
