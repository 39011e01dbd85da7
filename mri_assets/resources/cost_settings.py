"""Rates, caps and plan of the cost ledger as Dagster config, validated by `core.costs`."""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from mri_assets.core.costs import Caps, CostConfigError, Plan, Rates, config_from_mapping


class CostSettings(ConfigurableResource):
    """The plan's money: €/GPU-hour per node type, caps, the image plan, and a fallback throughput.

    Each mapping takes the field names of `core.costs.Rates`, `Caps` and `Plan`; anything left
    out keeps the plan's default. Misspelt keys, missing or negative rates, unknown node types
    and caps below the spend already made are `CostConfigError`s naming the field.
    """

    rates: dict[str, Any] = Field(default_factory=dict, description="core.costs.Rates fields")
    caps: dict[str, Any] = Field(default_factory=dict, description="core.costs.Caps fields")
    plan: dict[str, Any] = Field(default_factory=dict, description="core.costs.Plan fields")
    default_embedding_img_per_s: float = Field(
        default=200.0,
        description="embedding throughput assumed by the GPU budget check before any is measured",
    )

    def parsed_rates(self) -> Rates:
        return config_from_mapping(Rates, "cost.rates", self.rates)

    def parsed_caps(self) -> Caps:
        return config_from_mapping(Caps, "cost.caps", self.caps)

    def parsed_plan(self) -> Plan:
        return config_from_mapping(Plan, "cost.plan", self.plan)

    def fallback_img_per_s(self) -> float:
        value = self.default_embedding_img_per_s
        if not isinstance(value, int | float) or not value > 0:
            raise CostConfigError(
                f"cost.default_embedding_img_per_s={value!r} must be a number > 0 "
                "(images per second assumed before any embedding step is measured)"
            )
        return float(value)
