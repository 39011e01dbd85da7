"""The drift sensor's memory: baseline and per-wave drift state, kept in the sensor cursor."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mri_assets.core.clustering import DriftBaseline, DriftDecision, evaluate_drift


@dataclass(frozen=True)
class ClustersObservation:
    """What one `clusters` materialization says, read from its metadata."""

    storage_id: int
    wave: str
    model_id: str
    k: int
    ari: float | None


@dataclass
class DriftWatch:
    after_storage_id: int = 0
    baseline: DriftBaseline | None = None
    drifted_waves: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> DriftWatch:
        if not cursor:
            return cls()
        data = json.loads(cursor)
        baseline = DriftBaseline(**data["baseline"]) if data.get("baseline") else None
        return cls(data["after"], baseline, data.get("drifted", {}), data.get("events", {}))

    def to_cursor(self) -> str:
        baseline = self.baseline.__dict__ if self.baseline else None
        return json.dumps({"after": self.after_storage_id, "baseline": baseline,
                           "drifted": self.drifted_waves, "events": self.events}, sort_keys=True)

    def observe(
        self, seen: ClustersObservation, threshold: float, pinned_wave: str | None
    ) -> tuple[DriftDecision, str | None]:
        """Update the state with one materialization; return the decision and a run key to request.

        A run key is returned once per drift event: when a wave goes from not drifted to drifted.
        """
        self.after_storage_id = max(self.after_storage_id, seen.storage_id)
        if self._may_set_baseline(seen, pinned_wave):
            previous = self.baseline
            self.baseline = DriftBaseline(seen.wave, seen.model_id, seen.k, seen.ari)
            self.drifted_waves.pop(seen.wave, None)
            reason = f"wave {seen.wave} is the baseline"
            if previous is not None and previous.model_id != seen.model_id:
                reason += (f" (the backbone changed from {previous.model_id} of wave "
                           f"{previous.wave} to {seen.model_id}: the baseline restarts)")
            return DriftDecision(False, "baseline", 0.0, reason), None
        decision = evaluate_drift(self.baseline, seen.ari, seen.model_id, seen.k, threshold)
        if not decision.drifted:
            if decision.status == "stable":
                self.drifted_waves.pop(seen.wave, None)
            return decision, None
        if seen.wave in self.drifted_waves:
            return decision, None
        event = self.events.get(seen.wave, 0) + 1
        self.events[seen.wave] = event
        self.drifted_waves[seen.wave] = seen.storage_id
        return decision, f"ari-drift:{seen.wave}:{event}"

    def _may_set_baseline(self, seen: ClustersObservation, pinned_wave: str | None) -> bool:
        """The first wave with an ARI is the baseline (or the pinned wave). Without a pin, a wave
        embedded by another backbone than the baseline's starts a new baseline: ARI of different
        networks do not compare, and the waves after it are embedded by the new one."""
        if seen.ari is None:
            return False
        if pinned_wave is not None:
            return seen.wave == pinned_wave
        return (self.baseline is None or self.baseline.wave == seen.wave
                or self.baseline.model_id != seen.model_id)
