"""Agreement between two reads of the same cases (first expert read vs. QA re-read)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two label sequences over the same cases; None when there are no pairs.

    When both readers always use one and the same class, chance agreement is 1 and kappa is
    undefined; we return 1.0 (perfect agreement) in that case.
    """
    if len(first) != len(second):
        raise ValueError(
            f"both reads must cover the same cases: got {len(first)} and {len(second)} labels"
        )
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    counts_first, counts_second = Counter(first), Counter(second)
    expected = sum(counts_first[c] * counts_second[c] for c in counts_first) / (n * n)
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)
