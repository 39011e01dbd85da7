"""The classifier: the embedding backbone with a linear head, and the head as training sees it.

BatchNorm keeps its running statistics (eval mode) while its affine weights in layer3/layer4
learn: the stage-1 head was fitted on features normalised by those statistics, and batches of 32
slices of a few classes give noisy, class-skewed batch statistics that would shift every feature
between training and evaluation; with frozen statistics each BatchNorm is a learnable
per-channel affine map, the same in training and in evaluation.

Both stages train the head on standardised features (``StandardizedHead``, folded back into the
plain Linear afterwards): raw pooled backbone features share a large common component and their
stds span orders of magnitude, so one step size does not fit every weight of a head on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mri_assets.core.training.errors import TrainingError


class ClassifierModel(nn.Module):
    """Backbone + linear head. Keeps its class names and the id of the features its head fits.

    ``embedding_model_id`` is the backbone ``model_id`` whose cached embeddings the head can be
    applied to; it becomes ``None`` once the backbone itself has been fine-tuned in memory (the
    cached embeddings then no longer match; re-embed with the saved checkpoint's backbone).

    ``train_batchnorm_stats`` (set by ``configure_stage2``): when False, every BatchNorm keeps its
    running statistics in ``train()`` mode too (its affine weights still learn where unfrozen).
    """

    def __init__(self, backbone: nn.Module, class_names: Sequence[str], seed: int = 0):
        super().__init__()
        names = tuple(str(name) for name in class_names)
        if len(names) < 2:
            raise TrainingError(f"a classifier needs at least 2 classes, got {list(names)}")
        if len(set(names)) != len(names):
            raise TrainingError(f"class names must be unique, got {list(names)}")
        self.backbone = backbone
        self.class_names = names
        self.head = nn.Linear(int(backbone.dim), len(names))
        reset_head(self.head, seed)
        self.embedding_model_id: str | None = getattr(backbone, "model_id", None)
        self.train_batchnorm_stats = False
        freeze_backbone(self)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images_uint8))

    def train(self, mode: bool = True) -> ClassifierModel:
        """Like ``nn.Module.train``, but BatchNorm layers whose parameters are frozen (and all of
        them unless ``train_batchnorm_stats``) stay in eval mode: their running statistics never
        move while their weights are frozen."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    not self.train_batchnorm_stats
                    or not any(p.requires_grad for p in module.parameters(recurse=False))
                ):
                    module.eval()
        return self


def reset_head(head: nn.Linear, seed: int) -> None:
    """Seeded uniform(-1/sqrt(dim), 1/sqrt(dim)) init of weight and bias (PyTorch's default range)."""
    generator = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / float(head.in_features) ** 0.5
    with torch.no_grad():
        weight = torch.empty(head.weight.shape).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(head.bias.shape).uniform_(-bound, bound, generator=generator)
        head.weight.copy_(weight)
        head.bias.copy_(bias)


def freeze_backbone(model: ClassifierModel) -> None:
    """Stage 1 state: every backbone parameter frozen, head trainable."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def resnet_body(model: ClassifierModel) -> nn.Module:
    """The backbone's ResNet body, whose ``layer3`` and ``layer4`` stage 2 fine-tunes."""
    body = getattr(model.backbone, "body", None)
    if body is None or not hasattr(body, "layer3") or not hasattr(body, "layer4"):
        raise TrainingError(
            "stage 2 needs a ResNet backbone with .body.layer3 and .body.layer4 "
            "(core.backbone.build_backbone gives one)"
        )
    return body


def embedding_standardization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of embeddings (std 1 where a feature is constant)."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0) if len(x) > 1 else torch.ones_like(mean)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def standardized_linear(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """A Linear on (x - mean) / std computing exactly what ``head`` computes on x."""
    standardized = nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    with torch.no_grad():
        standardized.weight.copy_(head.weight * std)
        standardized.bias.copy_(head.bias + head.weight @ mean)
    return standardized


def fold_standardization(
    head: nn.Linear, standardized: nn.Linear, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Write into ``head`` the Linear on x that computes what ``standardized`` does on
    (x - mean) / std."""
    with torch.no_grad():
        weight = standardized.weight / std
        head.weight.copy_(weight)
        head.bias.copy_(standardized.bias - weight @ mean)


class StandardizedHead(nn.Module):
    """``linear((x - mean) / std)``: the head as stage 2 trains it; ``fold_into`` writes the plain
    Linear back."""

    def __init__(self, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().to(head.weight.device))
        self.register_buffer("std", std.detach().clone().to(head.weight.device))
        self.linear = standardized_linear(head, self.mean, self.std)
        self.in_features, self.out_features = head.in_features, head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)

    def fold_into(self, head: nn.Linear) -> nn.Linear:
        fold_standardization(head, self.linear, self.mean, self.std)
        return head
