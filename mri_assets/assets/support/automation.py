"""The automation conditions of the wave's assets, in one place.

Every condition ends in `apart_from_smoke`: the nightly smoke's wave (`partitions.SMOKE_WAVE`) is
materialized only by its own job, so automation never requests one of its partitions, whoever
materialized the partitions upstream of it. That part is Python (`OutsideWaves`), which Dagster
evaluates in the code location, not in the daemon: the automation sensor runs there
(`sensors.WaveAutomationSensor`, `use_user_code_server=True`).
"""

from __future__ import annotations

import dagster as dg

from mri_assets.assets.support.partitions import SMOKE_WAVE, wave_of_partition


class OutsideWaves(dg.AutomationCondition):
    """True for every partition whose wave is not one of `waves`."""

    def __init__(self, waves: frozenset[str]) -> None:
        self._waves = frozenset(waves)

    @property
    def name(self) -> str:
        return "outside_waves"

    @property
    def description(self) -> str:
        return f"not a partition of wave {', '.join(sorted(self._waves))}"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        candidates = context.candidate_subset
        if candidates.partitions_def is None:
            return dg.AutomationResult(context=context, true_subset=candidates)
        kept = {key for key in candidates.expensively_compute_partition_keys()
                if wave_of_partition(key) not in self._waves}
        return dg.AutomationResult(
            context=context, true_subset=candidates.compute_intersection_with_partition_keys(kept))


NOT_SMOKE = OutsideWaves(frozenset({SMOKE_WAVE}))


def apart_from_smoke(condition: dg.AutomationCondition) -> dg.AutomationCondition:
    """`condition`, never true for a partition of the smoke wave (evaluated last: only the
    partitions `condition` chose are looked at)."""
    return condition & NOT_SMOKE


# A wave's stage follows the stage before it (`eager()`: once every upstream partition of the
# wave is materialized and none is in progress).
EAGER = apart_from_smoke(dg.AutomationCondition.eager())
# The same, once the blocking checks of its upstream assets passed (`gpu_budget`'s caps).
EAGER_AFTER_CHECKS = apart_from_smoke(
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed())
