"""Four visually distinct slice patterns (one per class) and the models the training tests use."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mri_assets.core.backbone import build_backbone
from mri_assets.core.training.model import ClassifierModel
from mri_assets.core.training.two_stage import LabeledSlices, TrainConfig, TrainingData

CLASSES = ("axial_inferior", "axial_superior", "coronal", "sagittal")
SIZE = 64
FAST = TrainConfig(
    seed=3, head_epochs=5, finetune_epochs=1, batch_size=8, eval_batch_size=32, precision="fp32"
)


def build_model(seed: int = 0, classes=CLASSES) -> ClassifierModel:
    return ClassifierModel(build_backbone(seed=seed), classes, seed=seed)


def pattern_slices(n_per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Four visually distinct uint8 patterns (one per class) with noise and random phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images, labels = [], []
    for k, name in enumerate(CLASSES):
        for _ in range(n_per_class):
            phase = rng.uniform(0, 2 * np.pi)
            if k == 0:
                base = np.sin(12 * yy * np.pi + phase)
            elif k == 1:
                base = np.sin(12 * xx * np.pi + phase)
            elif k == 2:
                base = np.where(
                    (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < rng.uniform(0.05, 0.12), 1.0, -1.0
                )
            else:
                base = np.sign(np.sin(8 * yy * np.pi + phase) * np.sin(8 * xx * np.pi))
            noisy = base + rng.normal(0, 0.3, base.shape)
            images.append(np.clip((noisy + 1.5) * 85, 0, 255).astype(np.uint8))
            labels.append(name)
    return np.stack(images), labels


@torch.no_grad()
def embed(model: ClassifierModel, images: np.ndarray) -> np.ndarray:
    """The float16 embeddings the cache would hold for ``images``."""
    model.eval()
    return model.backbone(torch.from_numpy(images[:, None])).numpy().astype(np.float16)


def pattern_data(n_train_per_class: int, train_seed: int, eval_seed: int) -> TrainingData:
    """Patterned training slices with their cached embeddings, and two holdout slices a class."""
    train_images, train_labels = pattern_slices(n_train_per_class, seed=train_seed)
    eval_images, eval_labels = pattern_slices(2, seed=eval_seed)
    return TrainingData(
        train=LabeledSlices(train_images, train_labels, embed(build_model(), train_images)),
        holdout=LabeledSlices(eval_images, eval_labels),
    )


def label_codes(labels: list[str]) -> np.ndarray:
    return np.array([CLASSES.index(label) for label in labels])


@torch.no_grad()
def head_probs(model: ClassifierModel, embeddings: np.ndarray) -> np.ndarray:
    """Softmax of the model's head on cached embeddings."""
    return torch.softmax(model.head(torch.from_numpy(embeddings).float()), dim=1).numpy()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
