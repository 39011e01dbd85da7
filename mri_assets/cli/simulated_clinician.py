"""A simulated clinician for demos and tests: labels queued items from a ground-truth table.

It goes through the label store exactly like the triage app does (lease, submit, skip), so
budget, QA re-reads and the audit log behave as they would with people. Never use it on real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from mri_assets.resources.label_store import LabelStore

SIMULATED_EXPERT = "simulated-clinician"
SIMULATED_QA = "simulated-qa-reader"


@dataclass(frozen=True)
class SimulatedLabeling:
    labeled: int
    qa_labeled: int
    skipped_without_truth: int


def ensure_simulated_annotators(store: LabelStore, password: str) -> None:
    for name in (SIMULATED_EXPERT, SIMULATED_QA):
        if store.annotator_role(name) is None:
            store.add_annotator(name, password, "clinician")


def _work_queue(store: LabelStore, annotator: str, truth: dict[str, str],
                limit: int | None, on_item: Callable[[], None] | None) -> tuple[int, int, int]:
    labeled = qa = skipped = 0
    while limit is None or labeled + qa < limit:
        item = store.lease_next(annotator)
        if item is None:
            break
        label = truth.get(item["image_id"])
        if label is None:
            store.skip(item["id"], annotator)
            skipped += 1
        else:
            store.submit_label(item["id"], annotator, label, seconds_spent=4.0)
            if item.get("kind") == "qa":
                qa += 1
            else:
                labeled += 1
        if on_item is not None:
            on_item()
    return labeled, qa, skipped


def label_queue_from_truth(
    store: LabelStore, truth: pl.DataFrame, password: str, limit: int | None = None,
    on_item: Callable[[], None] | None = None,
) -> SimulatedLabeling:
    """Label every leased item whose image has a ground-truth label; skip the others."""
    ensure_simulated_annotators(store, password)
    lookup = dict(truth.select("image_id", "label").iter_rows())
    labeled, qa_first, skipped = _work_queue(store, SIMULATED_EXPERT, lookup, limit, on_item)
    _, qa_second, skipped_qa = _work_queue(store, SIMULATED_QA, lookup, None, on_item)
    return SimulatedLabeling(labeled, qa_first + qa_second, skipped + skipped_qa)
