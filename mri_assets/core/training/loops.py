"""The training and evaluation loops: stage 1 (a head on cached embeddings), one stage-2 epoch (on
uint8 image batches) and evaluation. Each takes its model, data, device and seed as arguments, in
the manner of torchvision's ``references/classification``; labels are integer indices into
``model.class_names``. A NaN/inf loss stops a loop with a ``TrainingError`` naming the stage,
epoch and step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from mri_assets.core.precision import autocast_for
from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.inputs import checked_embeddings
from mri_assets.core.training.metrics import EvalResult, eval_result_from_predictions
from mri_assets.core.training.model import (
    ClassifierModel,
    embedding_standardization,
    fold_standardization,
    standardized_linear,
)
from mri_assets.core.training.schedule import set_lr_factor


def _check_finite(loss: torch.Tensor, stage: int, epoch: int, step: int) -> float:
    value = float(loss.detach())
    if not np.isfinite(value):
        raise TrainingError(
            f"non-finite loss {value} in stage {stage}, epoch {epoch}, step {step}; "
            "lower the learning rate or check the inputs (the previous checkpoint is kept)"
        )
    return value


def train_head_on_embeddings(
    head: nn.Linear,
    embeddings_f16: Any,
    labels: np.ndarray,
    epochs: int = 5,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> list[dict[str, float]]:
    """Stage 1: fit ``head`` alone on cached embeddings (N, dim) with integer ``labels``.

    The head is optimised on per-feature standardised embeddings (raw backbone features share a
    large common component, which makes plain SGD/Adam on them ill-conditioned) and the
    standardisation is folded back into ``head``'s weight and bias, so ``head`` stays a plain
    Linear on raw backbone features. Returns one ``{"stage", "epoch", "loss", "accuracy"}`` entry
    per epoch (loss/accuracy measured on the batches while training)."""
    device = head.weight.device
    x = checked_embeddings(embeddings_f16, head.in_features).to(device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
    if len(y) != len(x):
        raise TrainingError(f"{len(x)} embeddings but {len(y)} labels")
    if len(y) == 0:
        raise TrainingError("no training labels for stage 1")
    if batch_size < 1:
        raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
    mean, std = embedding_standardization(x)
    z = (x - mean) / std
    standardized = standardized_linear(head, mean, std)
    optimizer = torch.optim.AdamW(standardized.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(seed))
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for step, start in enumerate(range(0, len(y), batch_size)):
            index = order[start : start + batch_size]
            logits = standardized(z[index])
            loss = criterion(logits, y[index])
            loss_sum += _check_finite(loss, 1, epoch, step) * len(index)
            correct += int((logits.argmax(1) == y[index]).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append(
            {"stage": 1, "epoch": epoch, "loss": loss_sum / len(y), "accuracy": correct / len(y)}
        )
    fold_standardization(head, standardized, mean, std)
    return history


def flip_left_right(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left/right (the last axis); never up/down, which would
    make one orientation class look like another."""
    flipped = torch.rand(images.shape[0], generator=generator) < 0.5
    if not bool(flipped.any()):
        return images
    out = images.clone()
    out[flipped] = images[flipped].flip(-1)
    return out


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    precision: str = "fp32",
    epoch: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    *,
    lr_factor: Callable[[int], float] | None = None,
    first_step: int = 0,
    flip_generator: torch.Generator | None = None,
    max_grad_norm: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (uint8 image batches).

    ``lr_factor(step)`` (steps counted from ``first_step``) scales every group's ``initial_lr``
    before each step; ``flip_generator`` mirrors a random half of each batch left/right;
    ``max_grad_norm`` clips the gradient norm of the trainable parameters; ``on_step(steps,
    loss)`` is called after each step with the steps finished so far (``first_step`` plus this
    pass's) and the step's loss."""
    device = torch.device(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_sum, correct, seen = 0.0, 0, 0
    step = first_step
    for batch_step, (images, labels) in enumerate(loader):
        if flip_generator is not None:
            images = flip_left_right(images, flip_generator)
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        if lr_factor is not None:
            set_lr_factor(optimizer, lr_factor(step))
        with autocast_for(device, precision):
            logits = model(images)
            loss = criterion(logits, labels)
        value = _check_finite(loss, 2, epoch, batch_step)
        optimizer.zero_grad(set_to_none=True)
        use_scaler = scaler is not None and scaler.is_enabled()
        (scaler.scale(loss) if use_scaler else loss).backward()
        if max_grad_norm is not None:
            if use_scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        if use_scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += value * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        step += 1
        if on_step is not None:
            on_step(step, value)
    if seen == 0:
        raise TrainingError(f"epoch {epoch}: the loader gave no batches")
    return {"stage": 2, "epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
            "steps": step - first_step}


@torch.no_grad()
def evaluate(
    model: ClassifierModel,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    precision: str = "fp32",
    channels_last: bool = False,
    features_out: list[np.ndarray] | None = None,
) -> EvalResult:
    """Predict every batch of ``loader`` in eval mode; confusion matrix, per-class and macro F1.
    With ``features_out`` (a list), the backbone features of each batch are appended to it."""
    device = torch.device(device)
    model.eval()
    truth, predicted = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, precision):
            features = model.backbone(images)
            logits = model.head(features)
        if features_out is not None:
            features_out.append(features.float().cpu().numpy())
        truth.append(labels.numpy())
        predicted.append(logits.argmax(1).cpu().numpy())
    if not truth:
        raise TrainingError("the evaluation set is empty; the wave needs labeled holdout slices")
    return eval_result_from_predictions(
        np.concatenate(truth), np.concatenate(predicted), model.class_names
    )
