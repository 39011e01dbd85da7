"""The classifier's stage-1 head as a numpy predictor on cached embeddings: class probabilities for
a whole wave without a backbone pass. The pseudo-label teacher is one (``fit_embedding_head``),
and the labeling queue ranks slices by the entropy of the one a classifier checkpoint carries
(``checkpoint.embedding_head_from_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.inputs import check_training_labels, encode_labels
from mri_assets.core.training.loops import train_head_on_embeddings
from mri_assets.core.training.model import reset_head
from mri_assets.core.training.two_stage import TrainConfig


@dataclass(frozen=True)
class EmbeddingHead:
    """A classifier's stage-1 head: class probabilities straight from cached embeddings of
    ``embedding_model_id`` (no backbone pass)."""

    class_names: tuple[str, ...]
    weight: np.ndarray  # (n_classes, dim) float64
    bias: np.ndarray  # (n_classes,) float64
    embedding_model_id: str

    @classmethod
    def from_state(cls, class_names: Sequence[str], state: dict[str, torch.Tensor],
                   embedding_model_id: str) -> EmbeddingHead:
        """From a head's ``state_dict`` (``weight``, ``bias``), e.g. ``TrainReport.stage1_head``."""
        return cls(class_names=tuple(str(name) for name in class_names),
                   weight=state["weight"].double().numpy(), bias=state["bias"].double().numpy(),
                   embedding_model_id=str(embedding_model_id))

    def predict_proba(self, embeddings: np.ndarray, model_id: str | None = None,
                      batch_rows: int = 65_536) -> np.ndarray:
        """Softmax (N, n_classes) float64 of cached embeddings; ``model_id``, when given, must be
        the one the head reads."""
        if model_id is not None and model_id != self.embedding_model_id:
            raise TrainingError(
                f"embeddings come from {model_id!r} but the classifier's head reads "
                f"{self.embedding_model_id!r}; re-embed the wave with that backbone"
            )
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise TrainingError(
                f"embeddings must have shape (N, {self.weight.shape[1]}), got {x.shape}")
        out = np.empty((len(x), len(self.class_names)), dtype=np.float64)
        for start in range(0, len(x), batch_rows):
            logits = x[start : start + batch_rows].astype(np.float64) @ self.weight.T + self.bias
            logits -= logits.max(axis=1, keepdims=True)
            np.exp(logits, out=logits)
            out[start : start + len(logits)] = logits / logits.sum(axis=1, keepdims=True)
        return out


def fit_embedding_head(
    embeddings: Any, labels: Sequence[str], class_names: Sequence[str], config: TrainConfig,
    embedding_model_id: str,
) -> EmbeddingHead:
    """Stage 1 alone: a linear head fitted on every cached embedding of ``embeddings`` with
    ``labels`` (class names), seeded as ``ClassifierModel``'s head, so it equals the stage-1 head
    ``train_two_stage`` fits on the same rows. No backbone pass, at train or predict time."""
    names = tuple(str(name) for name in class_names)
    y = encode_labels(labels, names, "training labels")
    check_training_labels(y, names)
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise TrainingError(f"embeddings must have shape (N, dim), got {x.shape}")
    head = nn.Linear(int(x.shape[1]), len(names))
    reset_head(head, config.seed)
    train_head_on_embeddings(head, x, y, epochs=config.head_epochs, lr=config.head_lr,
                             batch_size=config.head_batch_size, seed=config.seed,
                             weight_decay=config.weight_decay)
    return EmbeddingHead.from_state(names, head.state_dict(), embedding_model_id)
