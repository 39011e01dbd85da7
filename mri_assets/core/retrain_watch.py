"""The retrain sensor's memory: slices ingested since the last classifier, kept in its cursor."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class RetrainWatch:
    counted: dict[str, int] = field(default_factory=dict)
    base: int = 0
    crossings: int = 0
    after_manifest: int = 0
    after_classifier: int = 0

    @classmethod
    def from_cursor(cls, cursor: str | None) -> RetrainWatch:
        return cls(**json.loads(cursor)) if cursor else cls()

    def to_cursor(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    def saw_manifest(self, storage_id: int, wave: str, slices: int) -> None:
        """The latest manifest of a wave replaces its earlier count (re-ingesting adds nothing)."""
        self.counted[wave] = slices
        self.after_manifest = max(self.after_manifest, storage_id)

    def saw_classifier(self, storage_id: int) -> None:
        """A classifier was trained: counting starts again from here."""
        self.base = self.total
        self.after_classifier = max(self.after_classifier, storage_id)

    def since_classifier(self) -> int:
        """Slices ingested since the last classifier (or since counting began)."""
        return self.total - self.base

    def due(self, every: int) -> bool:
        """Whether the slices since the last classifier pass `every` (nothing is consumed)."""
        if every <= 0:
            raise ValueError(f"retrain threshold must be a positive number of slices, got {every}")
        return self.since_classifier() >= every

    def crossing(self, every: int) -> str | None:
        """A run key when the slices since the last classifier pass `every`, else None."""
        if not self.due(every):
            return None
        self.crossings += 1
        self.base += every * ((self.total - self.base) // every)
        return f"retrain:{self.crossings}"
