"""What a training run is judged by: holdout metrics (confusion, per-class and macro F1), and how
far stage 2 moved the backbone (relative L2 change of the layer3 and layer4 weights, cosine
between holdout embeddings before and after), so a report shows whether stage 2 fine-tuned the
backbone or left it as it was."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.model import ClassifierModel, resnet_body


@dataclass(frozen=True)
class EvalResult:
    """Holdout metrics. ``confusion[i, j]`` counts true class i predicted as j. Macro-F1 averages
    the classes that occur in the truth or the predictions (scikit-learn's default)."""

    class_names: tuple[str, ...]
    confusion: np.ndarray
    per_class_f1: dict[str, float]
    macro_f1: float
    accuracy: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "confusion": self.confusion.tolist(),
            "per_class_f1": dict(self.per_class_f1),
            "macro_f1": self.macro_f1,
            "accuracy": self.accuracy,
            "n": self.n,
        }


def eval_result_from_predictions(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> EvalResult:
    """The metrics of integer predictions ``y_pred`` against integer truth ``y_true``."""
    n_classes = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    present = denominator > 0
    n = len(y_true)
    return EvalResult(
        class_names=tuple(class_names),
        confusion=confusion,
        per_class_f1={name: float(v) for name, v in zip(class_names, f1, strict=True)},
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        accuracy=float(tp.sum() / n) if n else 0.0,
        n=n,
    )


def stage2_layer_weights(model: ClassifierModel) -> dict[str, torch.Tensor]:
    """CPU float copies of the layer3 and layer4 parameters, named ``layer3.*`` / ``layer4.*``."""
    body = resnet_body(model)
    return {f"{name}.{key}": value.detach().float().cpu().clone()
            for name in ("layer3", "layer4")
            for key, value in getattr(body, name).named_parameters()}


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                    prefix: str) -> float:
    """``||after - before|| / ||before||`` over every tensor whose name starts with ``prefix``."""
    names = [k for k in before if k.startswith(prefix)]
    if not names:
        raise TrainingError(f"no weights named {prefix}* to compare")
    delta = sum(float((after[k] - before[k]).pow(2).sum()) for k in names)
    base = sum(float(before[k].pow(2).sum()) for k in names)
    return math.sqrt(delta) / max(math.sqrt(base), 1e-12)


def mean_cosine(first: np.ndarray, second: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def backbone_shift(
    weights_before: dict[str, torch.Tensor], weights_after: dict[str, torch.Tensor],
    features_before: list[np.ndarray], features_after: list[np.ndarray],
) -> dict[str, float]:
    """How far stage 2 moved the backbone, from ``stage2_layer_weights`` and the holdout features
    (batch by batch) before and after it."""
    return {
        "layer3_relative_change": relative_change(weights_before, weights_after, "layer3."),
        "layer4_relative_change": relative_change(weights_before, weights_after, "layer4."),
        "holdout_embedding_cosine": mean_cosine(np.concatenate(features_before),
                                                np.concatenate(features_after)),
    }
