"""Cost model and ledger: measured spend against the plan's caps.

Spend is measured, never guessed: GPU seconds come from the GPU steps' own timings, storage from
the bytes written to the object store, labeling from the label store's counts. The ledger turns
those recorded events into euros per category (compute / storage / labeling), compares them with
the caps of the scale-up plan, projects the rest of the plan from the measured throughput, and
says whether a GPU step may start (`check_gpu_step`).

Units: euros, GPU hours, decimal gigabytes (1 GB = 10**9 bytes, as object stores bill). Storage is
charged for the horizon the storage cap covers (`Rates.storage_months`, 12 by default), so storage
spend is comparable with the "€500 / year" cap.

Pure and deterministic: no clocks, no I/O. A ledger is immutable; `record_*` returns a new one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

CATEGORIES = ("compute", "storage", "labeling")
# Pretraining (the self-supervised backbone) runs on the training node type, like retraining.
GPU_STAGES = ("embedding", "retraining", "pretraining")
BYTES_PER_GB = 10**9
SECONDS_PER_HOUR = 3600.0


class CostConfigError(ValueError):
    """Rates, caps or plan that cannot be used; the message names the field and what to change."""


def config_from_mapping(kind: type, section: str, values: Mapping[str, object] | None):
    """Build `Rates`, `Caps` or `Plan` from a config mapping, refusing misspelt keys."""
    values = dict(values or {})
    known = set(kind.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise CostConfigError(f"{section} has unknown keys {unknown}: use only {sorted(known)}")
    if kind is Plan and "waves" in values:
        waves = values["waves"]
        values["waves"] = (
            tuple(waves.items())
            if isinstance(waves, Mapping)
            else tuple(tuple(pair) for pair in waves)
        )
    return kind(**values)


def _frozen(mapping: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Rates:
    gpu_hourly: Mapping[str, float] = field(
        default_factory=lambda: _frozen({"t4-spot": 0.35, "a10": 0.50, "t4": 0.50})
    )
    embedding_node_type: str = "t4-spot"
    retraining_node_type: str = "a10"
    storage_per_gb_month: float = 0.005
    storage_months: int = 12
    label: float = 0.50
    qa: float = 0.05

    def __post_init__(self) -> None:
        if self.gpu_hourly is None:
            raise CostConfigError(
                "rates.gpu_hourly is missing: give each node type's €/GPU-hour, "
                "e.g. {'t4-spot': 0.35, 'a10': 0.50}"
            )
        object.__setattr__(self, "gpu_hourly", _frozen(self.gpu_hourly))
        if not self.gpu_hourly:
            raise CostConfigError(
                "rates.gpu_hourly is empty: give at least one node type with its €/GPU-hour, "
                "e.g. {'t4-spot': 0.35}"
            )
        for node_type, rate in self.gpu_hourly.items():
            _require_rate(f"rates.gpu_hourly[{node_type!r}]", rate, "€ per GPU-hour")
        for name in ("embedding_node_type", "retraining_node_type"):
            node_type = getattr(self, name)
            if node_type not in self.gpu_hourly:
                raise CostConfigError(
                    f"rates.{name}={node_type!r} is not a known node type; use one of "
                    f"{sorted(self.gpu_hourly)} or add its hourly rate to rates.gpu_hourly"
                )
        _require_rate("rates.storage_per_gb_month", self.storage_per_gb_month, "€ per GB-month")
        _require_rate("rates.label", self.label, "€ per expert label")
        _require_rate("rates.qa", self.qa, "€ per QA review")
        if not isinstance(self.storage_months, int) or self.storage_months < 1:
            raise CostConfigError(
                f"rates.storage_months={self.storage_months!r} must be a whole number of months "
                "≥ 1 (the horizon the storage cap covers, 12 for a yearly cap)"
            )

    def gpu_rate(self, node_type: str) -> float:
        if node_type not in self.gpu_hourly:
            raise CostConfigError(
                f"unknown node type {node_type!r}: use one of {sorted(self.gpu_hourly)} "
                "or add its hourly rate to rates.gpu_hourly"
            )
        return self.gpu_hourly[node_type]

    def node_type_for(self, stage: str) -> str:
        _require_stage(stage)
        return self.embedding_node_type if stage == "embedding" else self.retraining_node_type


@dataclass(frozen=True)
class Caps:
    total_eur: float = 5000.0
    compute_eur: float = 3000.0
    embedding_gpu_hours: float = 200.0
    retraining_gpu_hours: float = 120.0
    labeling_eur: float = 1650.0
    storage_eur_per_year: float = 500.0
    contingency_fraction: float = 0.10

    def __post_init__(self) -> None:
        for name in (
            "total_eur",
            "compute_eur",
            "embedding_gpu_hours",
            "retraining_gpu_hours",
            "labeling_eur",
            "storage_eur_per_year",
        ):
            _require_rate(f"caps.{name}", getattr(self, name), "cap")
        fraction = self.contingency_fraction
        if not _is_number(fraction) or not 0.0 <= fraction < 1.0:
            raise CostConfigError(
                f"caps.contingency_fraction={fraction!r} must be a number in [0, 1), "
                "e.g. 0.10 to hold back 10 % of the total budget"
            )

    @property
    def usable_eur(self) -> float:
        """The total budget less the contingency held back."""
        return self.total_eur * (1.0 - self.contingency_fraction)

    def for_category(self, category: str) -> float:
        return {
            "compute": self.compute_eur,
            "storage": self.storage_eur_per_year,
            "labeling": self.labeling_eur,
        }[category]

    def gpu_hours_for(self, stage: str) -> float:
        _require_stage(stage)
        return self.embedding_gpu_hours if stage == "embedding" else self.retraining_gpu_hours


@dataclass(frozen=True)
class Plan:
    total_images: int = 4_000_000
    waves: tuple[tuple[str, int], ...] = (
        ("pilot", 100_000),
        ("scale", 900_000),
        ("full-1", 750_000),
        ("full-2", 750_000),
        ("full-3", 750_000),
        ("full-4", 750_000),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", tuple((str(w), n) for w, n in self.waves))
        names = [wave for wave, _ in self.waves]
        if len(set(names)) != len(names):
            raise CostConfigError(f"plan.waves repeats a wave name: {names}; give each wave once")
        for wave, images in self.waves:
            if not isinstance(images, int) or images <= 0:
                raise CostConfigError(
                    f"plan.waves[{wave!r}]={images!r} must be a positive whole number of images"
                )
        planned = sum(images for _, images in self.waves)
        if planned != self.total_images:
            raise CostConfigError(
                f"plan.waves add up to {planned:,} images but plan.total_images is "
                f"{self.total_images:,}; make them agree"
            )

    @property
    def wave_names(self) -> tuple[str, ...]:
        return tuple(wave for wave, _ in self.waves)


@dataclass(frozen=True)
class GpuEvent:
    stage: str
    node_type: str
    gpu_seconds: float
    images: int = 0
    wave: str = ""


@dataclass(frozen=True)
class StorageEvent:
    bytes: int
    wave: str = ""


@dataclass(frozen=True)
class LabelEvent:
    expert: int
    qa: int
    wave: str = ""


CostEvent = GpuEvent | StorageEvent | LabelEvent


@dataclass(frozen=True)
class Spend:
    """Euros per category with the caps they count against."""

    compute: float
    storage: float
    labeling: float
    embedding_gpu_hours: float
    retraining_gpu_hours: float
    caps: Caps
    pretraining_gpu_hours: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.storage + self.labeling

    def by_category(self) -> dict[str, float]:
        return {"compute": self.compute, "storage": self.storage, "labeling": self.labeling}

    def percent_of_cap(self) -> dict[str, float]:
        shares = {
            category: _percent(eur, self.caps.for_category(category))
            for category, eur in self.by_category().items()
        }
        shares["total"] = _percent(self.total, self.caps.usable_eur)
        shares["embedding_gpu_hours"] = _percent(
            self.embedding_gpu_hours, self.caps.embedding_gpu_hours
        )
        shares["retraining_gpu_hours"] = _percent(
            self.retraining_gpu_hours, self.caps.retraining_gpu_hours
        )
        return shares

    @property
    def usable_budget_eur(self) -> float:
        return self.caps.usable_eur

    @property
    def budget_left_eur(self) -> float:
        return self.caps.usable_eur - self.total

    def as_metadata(self) -> dict[str, float]:
        """Flat figures (rounded to cents / 0.001 h / 0.01 %) for asset metadata and reports."""
        figures = {f"{category}_eur": round(eur, 2) for category, eur in self.by_category().items()}
        figures["total_eur"] = round(self.total, 2)
        figures["usable_budget_eur"] = round(self.usable_budget_eur, 2)
        figures["budget_left_eur"] = round(self.budget_left_eur, 2)
        figures["embedding_gpu_hours"] = round(self.embedding_gpu_hours, 3)
        figures["retraining_gpu_hours"] = round(self.retraining_gpu_hours, 3)
        figures["pretraining_gpu_hours"] = round(self.pretraining_gpu_hours, 3)
        for name, share in self.percent_of_cap().items():
            figures[f"{name}_pct_of_cap"] = round(share, 2)
        return figures


@dataclass(frozen=True)
class Projection:
    """Projected spend for the images of the plan not processed yet, from measured rates."""

    images_done: int
    images_remaining: int
    throughput_img_per_s: float
    embedding_gpu_hours: float
    retraining_gpu_hours: float
    compute: float
    storage: float
    labeling: float
    pretraining_gpu_hours: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.storage + self.labeling

    def by_category(self) -> dict[str, float]:
        return {"compute": self.compute, "storage": self.storage, "labeling": self.labeling}

    def as_metadata(self) -> dict[str, float]:
        figures = {
            f"projected_{category}_eur": round(eur, 2)
            for category, eur in self.by_category().items()
        }
        figures["projected_total_eur"] = round(self.total, 2)
        figures["projected_embedding_gpu_hours"] = round(self.embedding_gpu_hours, 3)
        figures["projected_retraining_gpu_hours"] = round(self.retraining_gpu_hours, 3)
        figures["projected_pretraining_gpu_hours"] = round(self.pretraining_gpu_hours, 3)
        figures["images_done"] = self.images_done
        figures["images_remaining"] = self.images_remaining
        return figures


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str
    figures: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WaveSpend:
    wave: str
    compute: float
    storage: float
    labeling: float

    @property
    def total(self) -> float:
        return self.compute + self.storage + self.labeling


class CostLedger:
    """Measured spend from recorded events, checked against the caps.

    Built from config (`rates`, `caps`, `plan`) and the events recorded so far; raises
    `CostConfigError` when a cap is already below the spend those events prove. Recording new
    measured spend never raises: an overspend shows as more than 100 % of the cap and
    `check_gpu_step` refuses further work.
    """

    def __init__(
        self,
        rates: Rates | None = None,
        caps: Caps | None = None,
        plan: Plan | None = None,
        events: Iterable[CostEvent] = (),
    ) -> None:
        self.rates = rates if rates is not None else Rates()
        self.caps = caps if caps is not None else Caps()
        self.plan = plan if plan is not None else Plan()
        self.events: tuple[CostEvent, ...] = tuple(events)
        for event in self.events:
            _validate_event(event, self.rates)
        _require_caps_cover_spend(self.caps, self.spend())

    def _with_event(self, event: CostEvent) -> CostLedger:
        _validate_event(event, self.rates)
        ledger = object.__new__(CostLedger)
        ledger.rates, ledger.caps, ledger.plan = self.rates, self.caps, self.plan
        ledger.events = (*self.events, event)
        return ledger

    def record_gpu_seconds(
        self, stage: str, node_type: str, seconds: float, *, images: int = 0, wave: str = ""
    ) -> CostLedger:
        return self._with_event(GpuEvent(stage, node_type, seconds, images, wave))

    def record_storage_bytes(self, n_bytes: int, *, wave: str = "") -> CostLedger:
        return self._with_event(StorageEvent(n_bytes, wave))

    def record_labels(self, expert: int, qa: int, *, wave: str = "") -> CostLedger:
        return self._with_event(LabelEvent(expert, qa, wave))

    def gpu_hours(self, stage: str) -> float:
        _require_stage(stage)
        seconds = sum(
            e.gpu_seconds for e in self.events if isinstance(e, GpuEvent) and e.stage == stage
        )
        return seconds / SECONDS_PER_HOUR

    def spend(self, events: Iterable[CostEvent] | None = None) -> Spend:
        chosen = self.events if events is None else tuple(events)
        compute = storage = labeling = 0.0
        hours = {stage: 0.0 for stage in GPU_STAGES}
        for event in chosen:
            if isinstance(event, GpuEvent):
                event_hours = event.gpu_seconds / SECONDS_PER_HOUR
                hours[event.stage] += event_hours
                compute += event_hours * self.rates.gpu_rate(event.node_type)
            elif isinstance(event, StorageEvent):
                storage += storage_eur(event.bytes, self.rates)
            else:
                labeling += event.expert * self.rates.label + event.qa * self.rates.qa
        return Spend(
            compute=compute,
            storage=storage,
            labeling=labeling,
            embedding_gpu_hours=hours["embedding"],
            retraining_gpu_hours=hours["retraining"],
            caps=self.caps,
            pretraining_gpu_hours=hours["pretraining"],
        )

    def images_embedded(self) -> int:
        return sum(
            e.images for e in self.events if isinstance(e, GpuEvent) and e.stage == "embedding"
        )

    def spend_by_wave(self) -> list[WaveSpend]:
        """Spend per wave: the plan's waves in plan order, then other waves in recorded order."""
        order = list(self.plan.wave_names)
        for event in self.events:
            if event.wave not in order:
                order.append(event.wave)
        rows = []
        for wave in order:
            spend = self.spend(e for e in self.events if e.wave == wave)
            rows.append(WaveSpend(wave, spend.compute, spend.storage, spend.labeling))
        return rows

    def project(
        self,
        measured_throughput_img_per_s: float,
        images_done: int,
        images_remaining: int | None = None,
        backbones_to_train: int = 0,
    ) -> Projection:
        """Projected € for the rest of the plan per category, from what was measured so far.

        Embedding: remaining images / measured images per second on the embedding node type.
        Retraining, storage and labeling: the measured spend per image done, times the images
        remaining (nothing measured yet projects as zero for that category). Labeling stops at
        its cap, as the label store does, so its projection is at most the cap left.
        Pretraining does not grow with the images (a fixed step budget per backbone): the
        measured hours per backbone trained so far, times `backbones_to_train` (0 under the
        `first` policy, where the pilot's backbone embeds every later wave).
        """
        _require_positive("measured_throughput_img_per_s", measured_throughput_img_per_s)
        if not isinstance(images_done, int) or images_done < 0:
            raise CostConfigError(f"images_done={images_done!r} must be a whole number ≥ 0")
        remaining = (
            max(self.plan.total_images - images_done, 0)
            if images_remaining is None
            else images_remaining
        )
        if not isinstance(remaining, int) or remaining < 0:
            raise CostConfigError(f"images_remaining={remaining!r} must be a whole number ≥ 0")
        spend = self.spend()
        per_image = 1.0 / images_done if images_done else 0.0
        embedding_hours = remaining / measured_throughput_img_per_s / SECONDS_PER_HOUR
        retraining_hours = spend.retraining_gpu_hours * per_image * remaining
        compute = embedding_hours * self.rates.gpu_rate(self.rates.embedding_node_type)
        compute += retraining_hours * self.rates.gpu_rate(self.rates.retraining_node_type)
        trained = sum(1 for e in self.events if isinstance(e, GpuEvent) and e.stage == "pretraining")
        if not isinstance(backbones_to_train, int) or backbones_to_train < 0:
            raise CostConfigError(f"backbones_to_train={backbones_to_train!r} must be a whole number ≥ 0")
        pretraining_hours = (spend.pretraining_gpu_hours / trained * backbones_to_train) if trained else 0.0
        compute += pretraining_hours * self.rates.gpu_rate(self.rates.retraining_node_type)
        return Projection(
            images_done=images_done,
            images_remaining=remaining,
            throughput_img_per_s=measured_throughput_img_per_s,
            embedding_gpu_hours=embedding_hours,
            retraining_gpu_hours=retraining_hours,
            compute=compute,
            storage=spend.storage * per_image * remaining,
            labeling=min(
                spend.labeling * per_image * remaining,
                max(self.caps.labeling_eur - spend.labeling, 0.0),
            ),
            pretraining_gpu_hours=pretraining_hours,
        )

    def check_gpu_step(
        self, stage: str, images: int, measured_img_per_s: float, node_type: str
    ) -> Verdict:
        """Whether a GPU step of `images` at the measured rate stays under every cap it touches."""
        _require_stage(stage)
        rate = self.rates.gpu_rate(node_type)
        _require_positive("measured_img_per_s", measured_img_per_s)
        if not isinstance(images, int) or images < 0:
            raise CostConfigError(f"images={images!r} must be a whole number ≥ 0")
        step_hours = images / measured_img_per_s / SECONDS_PER_HOUR
        step_eur = step_hours * rate
        spend = self.spend()
        stage_hours = self.gpu_hours(stage)
        step = (
            f"this {stage} step: {images:,} images at {measured_img_per_s:.2f} img/s on "
            f"{node_type} (€{rate:.2f}/GPU-h) = {step_hours:.2f} GPU-h, €{step_eur:.2f}"
        )
        figures = {
            "step_gpu_hours": round(step_hours, 4),
            "step_eur": round(step_eur, 2),
            f"{stage}_gpu_hours_spent": round(stage_hours, 4),
            f"{stage}_gpu_hours_cap": self.caps.gpu_hours_for(stage),
            "compute_eur_spent": round(spend.compute, 2),
            "compute_eur_cap": self.caps.compute_eur,
            "total_eur_spent": round(spend.total, 2),
            "usable_budget_eur": round(self.caps.usable_eur, 2),
        }
        limits = (
            (
                f"caps.{stage}_gpu_hours",
                self.caps.gpu_hours_for(stage),
                stage_hours,
                step_hours,
                "GPU-h",
            ),
            ("caps.compute_eur", self.caps.compute_eur, spend.compute, step_eur, "€"),
            (
                (
                    f"usable budget (caps.total_eur less {self.caps.contingency_fraction:.0%} "
                    "contingency)"
                ),
                self.caps.usable_eur,
                spend.total,
                step_eur,
                "€",
            ),
        )
        for name, cap, spent, added, unit in limits:
            if spent + added > cap:
                return Verdict(
                    allowed=False,
                    message=(
                        f"refused: {name} = {_amount(cap, unit)} would be crossed: spent "
                        f"{_amount(spent, unit)} + {step} -> {_amount(spent + added, unit)}. "
                        f"Process fewer images, use a cheaper node type, or raise {name}."
                    ),
                    figures=figures,
                )
        return Verdict(
            allowed=True,
            message=(
                f"allowed: {step}; {stage} GPU-h {stage_hours + step_hours:.2f} of "
                f"{self.caps.gpu_hours_for(stage):.0f}, compute €{spend.compute + step_eur:.2f} "
                f"of €{self.caps.compute_eur:.0f}, total €{spend.total + step_eur:.2f} of "
                f"€{self.caps.usable_eur:.0f} usable"
            ),
            figures=figures,
        )


def storage_eur(n_bytes: int, rates: Rates) -> float:
    """Cost of keeping `n_bytes` for the horizon the storage cap covers."""
    return n_bytes / BYTES_PER_GB * rates.storage_per_gb_month * rates.storage_months


def _amount(value: float, unit: str) -> str:
    return f"€{value:,.2f}" if unit == "€" else f"{value:,.2f} {unit}"


def _percent(value: float, cap: float) -> float:
    if cap == 0:
        return 0.0 if value == 0 else math.inf
    return 100.0 * value / cap


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_rate(name: str, value: object, unit: str) -> None:
    if value is None:
        raise CostConfigError(f"{name} is missing: set it to a number ≥ 0 ({unit})")
    if not _is_number(value) or value < 0:
        raise CostConfigError(f"{name}={value!r} must be a finite number ≥ 0 ({unit})")


def _require_positive(name: str, value: object) -> None:
    if not _is_number(value) or value <= 0:
        raise CostConfigError(f"{name}={value!r} must be a finite number > 0")


def _require_stage(stage: str) -> None:
    if stage not in GPU_STAGES:
        raise CostConfigError(f"unknown GPU stage {stage!r}: use one of {list(GPU_STAGES)}")


def _validate_event(event: CostEvent, rates: Rates) -> None:
    if isinstance(event, GpuEvent):
        _require_stage(event.stage)
        rates.gpu_rate(event.node_type)
        if not _is_number(event.gpu_seconds) or event.gpu_seconds < 0:
            raise CostConfigError(
                f"gpu_seconds={event.gpu_seconds!r} for stage {event.stage!r} must be ≥ 0"
            )
        if not isinstance(event.images, int) or event.images < 0:
            raise CostConfigError(f"images={event.images!r} must be a whole number ≥ 0")
    elif isinstance(event, StorageEvent):
        if not isinstance(event.bytes, int) or event.bytes < 0:
            raise CostConfigError(f"storage bytes={event.bytes!r} must be a whole number ≥ 0")
    elif isinstance(event, LabelEvent):
        for name in ("expert", "qa"):
            count = getattr(event, name)
            if not isinstance(count, int) or count < 0:
                raise CostConfigError(f"labels {name}={count!r} must be a whole number ≥ 0")
    else:
        raise CostConfigError(
            f"unknown cost event {event!r}: use GpuEvent, StorageEvent or LabelEvent"
        )


def _require_caps_cover_spend(caps: Caps, spend: Spend) -> None:
    checks = (
        ("caps.compute_eur", caps.compute_eur, spend.compute, "€"),
        ("caps.storage_eur_per_year", caps.storage_eur_per_year, spend.storage, "€"),
        ("caps.labeling_eur", caps.labeling_eur, spend.labeling, "€"),
        ("caps.embedding_gpu_hours", caps.embedding_gpu_hours, spend.embedding_gpu_hours, "GPU-h"),
        (
            "caps.retraining_gpu_hours",
            caps.retraining_gpu_hours,
            spend.retraining_gpu_hours,
            "GPU-h",
        ),
        ("caps.total_eur", caps.total_eur, spend.total, "€"),
    )
    for name, cap, spent, unit in checks:
        if cap < spent:
            raise CostConfigError(
                f"{name}={_amount(cap, unit)} is below the spend already made "
                f"({_amount(spent, unit)}); raise {name} to at least {_amount(spent, unit)}"
            )
