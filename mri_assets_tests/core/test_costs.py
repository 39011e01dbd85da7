import io

import pytest
from PIL import Image

from mri_assets.core.costs import (
    Caps,
    CostConfigError,
    CostLedger,
    GpuEvent,
    LabelEvent,
    Plan,
    Rates,
    StorageEvent,
    config_from_mapping,
)
from mri_assets.core.costs_plot import burndown_png

# A recorded pilot run: the GPU steps' own timings, the bytes written, the label store's counts.
PILOT_EMBED_SECONDS = 9_000.0  # 100,000 slices embedded on one T4 spot node
PILOT_EMBED_IMAGES = 100_000
PILOT_RETRAIN_SECONDS = 3_600.0  # one fine-tune on an A10
PILOT_STORAGE_BYTES = 4_200_000_000  # slices + embeddings written
PILOT_EXPERT_LABELS = 300
PILOT_QA_REVIEWS = 300


def recorded_pilot() -> CostLedger:
    return (
        CostLedger()
        .record_gpu_seconds(
            "embedding", "t4-spot", PILOT_EMBED_SECONDS, images=PILOT_EMBED_IMAGES, wave="pilot"
        )
        .record_gpu_seconds("retraining", "a10", PILOT_RETRAIN_SECONDS, wave="pilot")
        .record_storage_bytes(PILOT_STORAGE_BYTES, wave="pilot")
        .record_labels(PILOT_EXPERT_LABELS, PILOT_QA_REVIEWS, wave="pilot")
    )


def test_ledger_reproduces_hand_computed_spend_for_recorded_pilot():
    spend = recorded_pilot().spend()

    # by hand: 9000 s = 2.5 GPU-h x €0.35 = €0.875; 3600 s = 1 GPU-h x €0.50 = €0.50
    assert spend.embedding_gpu_hours == pytest.approx(2.5)
    assert spend.retraining_gpu_hours == pytest.approx(1.0)
    assert spend.compute == pytest.approx(0.875 + 0.50)
    # 4.2 GB x €0.005/GB-month x 12 months = €0.252
    assert spend.storage == pytest.approx(0.252)
    # 300 x €0.50 + 300 x €0.05 = €165
    assert spend.labeling == pytest.approx(165.0)
    assert spend.total == pytest.approx(1.375 + 0.252 + 165.0)


def test_ledger_reports_percent_of_each_cap_and_budget_left_after_contingency():
    spend = recorded_pilot().spend()
    shares = spend.percent_of_cap()

    assert shares["compute"] == pytest.approx(100 * 1.375 / 3000)
    assert shares["storage"] == pytest.approx(100 * 0.252 / 500)
    assert shares["labeling"] == pytest.approx(10.0)  # 165 of 1650
    assert shares["embedding_gpu_hours"] == pytest.approx(100 * 2.5 / 200)
    assert shares["retraining_gpu_hours"] == pytest.approx(100 * 1.0 / 120)
    # usable: €5000 less 10 % contingency = €4500
    assert spend.usable_budget_eur == pytest.approx(4500.0)
    assert spend.budget_left_eur == pytest.approx(4500.0 - 166.627)
    assert spend.as_metadata()["budget_left_eur"] == pytest.approx(4333.37)


def test_projection_extrapolates_measured_throughput_to_the_rest_of_the_plan():
    ledger = recorded_pilot()
    throughput = PILOT_EMBED_IMAGES / PILOT_EMBED_SECONDS  # 11.11 img/s measured

    projection = ledger.project(throughput, images_done=100_000)

    assert projection.images_remaining == 3_900_000
    # 3.9M images / (100k / 9000 s) = 351,000 s = 97.5 GPU-h x €0.35 = €34.125
    assert projection.embedding_gpu_hours == pytest.approx(97.5)
    # retraining measured at 1 GPU-h per 100k images -> 39 GPU-h x €0.50 = €19.5
    assert projection.retraining_gpu_hours == pytest.approx(39.0)
    assert projection.compute == pytest.approx(34.125 + 19.5)
    # storage €0.252 per 100k images -> x 39
    assert projection.storage == pytest.approx(0.252 * 39)
    # labeling would extrapolate to €6435 but the label store stops at the €1650 cap
    assert projection.labeling == pytest.approx(1650.0 - 165.0)


def test_projection_for_given_remaining_images_scales_linearly():
    ledger = recorded_pilot()
    half = ledger.project(10.0, images_done=100_000, images_remaining=900_000)
    full = ledger.project(10.0, images_done=100_000, images_remaining=1_800_000)

    assert full.embedding_gpu_hours == pytest.approx(2 * half.embedding_gpu_hours)
    assert full.storage == pytest.approx(2 * half.storage)


def test_gpu_step_within_caps_is_allowed_with_its_figures():
    verdict = recorded_pilot().check_gpu_step("embedding", 900_000, 11.0, "t4-spot")

    assert verdict.allowed, verdict.message
    # 900,000 / 11 img/s / 3600 = 22.727 GPU-h
    assert verdict.figures["step_gpu_hours"] == pytest.approx(900_000 / 11 / 3600, abs=1e-4)
    assert verdict.figures["step_eur"] == pytest.approx(900_000 / 11 / 3600 * 0.35, abs=0.01)


def test_gpu_step_crossing_embedding_gpu_hours_cap_is_refused_naming_cap_and_figures():
    ledger = CostLedger().record_gpu_seconds("embedding", "t4-spot", 190 * 3600.0)

    # 100,000 images at 2 img/s = 13.89 GPU-h; 190 + 13.89 > 200
    verdict = ledger.check_gpu_step("embedding", 100_000, 2.0, "t4-spot")

    assert not verdict.allowed
    assert "caps.embedding_gpu_hours" in verdict.message
    assert "200.00 GPU-h" in verdict.message
    assert "190.00 GPU-h" in verdict.message
    assert "13.89 GPU-h" in verdict.message
    assert "203.89 GPU-h" in verdict.message


def test_gpu_step_crossing_compute_euro_cap_is_refused():
    ledger = CostLedger(caps=Caps(compute_eur=20.0)).record_gpu_seconds(
        "retraining", "a10", 30 * 3600.0
    )

    # spent 30 h x €0.50 = €15; step 40,000 / 1 img/s = 11.11 h x €0.50 = €5.56 -> €20.56 > €20
    verdict = ledger.check_gpu_step("retraining", 40_000, 1.0, "a10")

    assert not verdict.allowed
    assert "caps.compute_eur" in verdict.message
    assert "€20.00" in verdict.message
    assert "€15.00" in verdict.message


def test_gpu_step_crossing_usable_budget_is_refused_even_under_category_caps():
    caps = Caps(total_eur=200.0, labeling_eur=1650.0)
    ledger = CostLedger(caps=caps).record_labels(320, 320)  # €176 of €180 usable

    # 20,000 images / 0.5 img/s = 11.11 GPU-h x €0.35 = €3.89 -> €179.89: allowed
    assert ledger.check_gpu_step("embedding", 20_000, 0.5, "t4-spot").allowed
    # 40,000 images -> €7.78 -> €183.78 > €180 (€200 less 10 %)
    verdict = ledger.check_gpu_step("embedding", 40_000, 0.5, "t4-spot")
    assert not verdict.allowed
    assert "usable budget" in verdict.message
    assert "€180.00" in verdict.message


def test_gpu_step_on_unknown_node_type_is_a_config_error():
    with pytest.raises(CostConfigError, match=r"unknown node type 'h100'.*rates.gpu_hourly"):
        CostLedger().check_gpu_step("embedding", 10, 1.0, "h100")


def test_gpu_step_with_zero_throughput_is_a_config_error():
    with pytest.raises(CostConfigError, match="measured_img_per_s"):
        CostLedger().check_gpu_step("embedding", 10, 0.0, "t4-spot")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gpu_hourly": {"t4-spot": -0.35, "a10": 0.5}}, r"rates.gpu_hourly\['t4-spot'\]"),
        (
            {"gpu_hourly": {"t4-spot": None, "a10": 0.5}},
            r"rates.gpu_hourly\['t4-spot'\] is missing",
        ),
        ({"gpu_hourly": None}, "rates.gpu_hourly is missing"),
        ({"storage_per_gb_month": -0.005}, "rates.storage_per_gb_month"),
        ({"label": None}, "rates.label is missing"),
        ({"qa": -1}, "rates.qa"),
        ({"embedding_node_type": "l4"}, "rates.embedding_node_type='l4' is not a known node type"),
        ({"gpu_hourly": {"t4-spot": 0.35}}, "rates.retraining_node_type='a10'"),
    ],
)
def test_missing_or_negative_rates_are_config_errors_naming_the_field(kwargs, field):
    with pytest.raises(CostConfigError, match=field):
        Rates(**kwargs)


def test_negative_cap_is_a_config_error():
    with pytest.raises(CostConfigError, match="caps.labeling_eur"):
        Caps(labeling_eur=-1.0)


def test_caps_below_spend_already_made_are_config_errors_saying_what_to_raise():
    events = [LabelEvent(expert=1000, qa=1000, wave="pilot")]  # €550 spent on labels

    with pytest.raises(
        CostConfigError, match=r"caps.labeling_eur=€500.00 is below .*€550.00.*at least €550.00"
    ):
        CostLedger(caps=Caps(labeling_eur=500.0), events=events)


def test_gpu_hours_cap_below_recorded_hours_is_a_config_error():
    events = [GpuEvent("embedding", "t4-spot", 11 * 3600.0)]

    with pytest.raises(CostConfigError, match="caps.embedding_gpu_hours"):
        CostLedger(caps=Caps(embedding_gpu_hours=10.0), events=events)


def test_recorded_event_with_unknown_node_type_or_stage_is_a_config_error():
    with pytest.raises(CostConfigError, match="unknown node type 'v100'"):
        CostLedger(events=[GpuEvent("embedding", "v100", 10.0)])
    with pytest.raises(CostConfigError, match="unknown GPU stage 'clusters'"):
        CostLedger().record_gpu_seconds("clusters", "t4", 10.0)


def test_plan_waves_must_add_up_to_total_images():
    with pytest.raises(CostConfigError, match="add up to 1,000 images"):
        Plan(total_images=2_000, waves=(("pilot", 1_000),))


def test_default_plan_is_four_million_images_in_six_waves():
    plan = Plan()

    assert plan.wave_names == ("pilot", "scale", "full-1", "full-2", "full-3", "full-4")
    assert sum(images for _, images in plan.waves) == 4_000_000


def test_config_mapping_with_misspelt_key_is_refused_listing_valid_keys():
    with pytest.raises(CostConfigError, match=r"caps has unknown keys \['compute_euro'\]"):
        config_from_mapping(Caps, "caps", {"compute_euro": 10})

    plan = config_from_mapping(Plan, "plan", {"total_images": 30, "waves": {"a": 10, "b": 20}})
    assert plan.wave_names == ("a", "b")


def test_spend_by_wave_follows_plan_order_then_other_waves():
    ledger = (
        CostLedger()
        .record_storage_bytes(10**9, wave="smoke")
        .record_labels(2, 2, wave="scale")
        .record_labels(1, 1, wave="pilot")
    )

    rows = ledger.spend_by_wave()

    assert [row.wave for row in rows] == [*Plan().wave_names, "smoke"]
    assert rows[0].labeling == pytest.approx(0.55)
    assert rows[1].labeling == pytest.approx(1.10)
    assert rows[-1].storage == pytest.approx(0.005 * 12)


def test_ledger_is_immutable_recording_returns_a_new_ledger():
    empty = CostLedger()
    one = empty.record_labels(1, 1)

    assert empty.spend().total == 0.0
    assert one.spend().labeling == pytest.approx(0.55)


def test_recording_spend_past_a_cap_shows_over_100_percent_and_blocks_gpu_steps():
    ledger = CostLedger().record_gpu_seconds("retraining", "a10", 121 * 3600.0)

    assert ledger.spend().percent_of_cap()["retraining_gpu_hours"] > 100
    assert not ledger.check_gpu_step("retraining", 1, 100.0, "a10").allowed


def test_storage_events_validate_bytes():
    with pytest.raises(CostConfigError, match="storage bytes"):
        CostLedger(events=[StorageEvent(-5)])


def test_burndown_png_is_a_png_of_the_configured_size():
    ledger = recorded_pilot()
    projection = ledger.project(11.0, images_done=100_000)

    png = burndown_png(ledger, projection, dpi=50)

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (400, 225)  # 8 x 4.5 inches at 50 dpi


def test_burndown_png_draws_the_projection():
    ledger = recorded_pilot()

    without = burndown_png(ledger, dpi=40)
    with_projection = burndown_png(ledger, ledger.project(11.0, images_done=100_000), dpi=40)

    assert without != with_projection


def test_pretraining_is_spent_on_the_training_node_and_projected_per_backbone_not_per_image():
    rates = Rates()
    ledger = CostLedger().record_gpu_seconds("pretraining", "a10", 1800.0, wave="pilot")
    spend = ledger.spend()
    assert spend.pretraining_gpu_hours == pytest.approx(0.5)
    assert spend.compute == pytest.approx(0.5 * rates.gpu_rate("a10"))
    assert spend.as_metadata()["pretraining_gpu_hours"] == 0.5
    # The budget is fixed per backbone: more images do not project more pretraining...
    first = ledger.project(100.0, 2_000)
    assert first.pretraining_gpu_hours == 0.0
    # ...another backbone to train (policy `every`) projects the measured hours once more.
    every = ledger.project(100.0, 2_000, backbones_to_train=3)
    assert every.pretraining_gpu_hours == pytest.approx(1.5)
    assert every.compute - first.compute == pytest.approx(1.5 * rates.gpu_rate("a10"))
    with pytest.raises(CostConfigError, match="backbones_to_train"):
        ledger.project(100.0, 2_000, backbones_to_train=-1)
