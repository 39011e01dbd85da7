"""The classifier checkpoint (``models/classifier/WAVE.pt``): written once per trained wave, read
for its fine-tuned backbone (to embed with it) and for its stage-1 head (to rank a wave's slices
from cached embeddings)."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mri_assets.core.backbone import CHECKPOINT_WEIGHTS, model_id_for
from mri_assets.core.training.embedding_head import EmbeddingHead
from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.model import ClassifierModel

CHECKPOINT_FORMAT = "mri_assets.classifier/1"


def _backbone_identity(backbone: nn.Module) -> tuple[str, int | None]:
    arch = getattr(backbone, "arch", None)
    if arch is None:
        arch = (getattr(backbone, "model_id", None) or "resnet18").split(":")[0]
    return str(arch), getattr(backbone, "input_size", None)


def save_checkpoint(
    model: ClassifierModel,
    class_names: Sequence[str],
    meta: dict[str, Any],
    embedding_head: dict[str, torch.Tensor] | None = None,
    embedding_model_id: str | None = None,
) -> bytes:
    """``torch.save`` bytes of a dict (readable with ``torch.load(..., weights_only=True)``):

    - ``format``: ``"mri_assets.classifier/1"``
    - ``arch``, ``input_size``: how to rebuild the backbone (``core.backbone.build_backbone``)
    - ``class_names``: list of str, in head-output order
    - ``state_dict``: the whole ``ClassifierModel`` state dict, contiguous CPU tensors; backbone
      keys are ``Backbone.state_dict()`` keys prefixed with ``backbone.`` (e.g.
      ``backbone.body.layer4.1.bn2.weight``); head keys are ``head.weight`` / ``head.bias``
    - ``backbone_model_id``: the ``model_id`` that ``build_backbone(checkpoint=...)`` gives for
      these backbone weights, i.e. the id of embeddings made with the (fine-tuned) backbone
    - ``meta``: JSON text of ``meta`` (data snapshot ids, metrics, ...)
    - optionally ``embedding_head`` (``weight``, ``bias``: the stage-1 head, ``TrainReport.stage1_head``)
      and ``embedding_model_id`` (the backbone whose cached embeddings it reads): the classifier's
      predictions from cached embeddings, e.g. to rank a wave's slices by predictive entropy
      without running the fine-tuned backbone over every slice (``EmbeddingHead``)

    ``backbone_checkpoint(data)`` gives the flat ``body.*`` state dict bytes that
    ``build_backbone(checkpoint=...)`` reads.
    """
    names = [str(name) for name in class_names]
    if tuple(names) != model.class_names:
        raise TrainingError(
            f"checkpoint class names {names} differ from the model's {list(model.class_names)}"
        )
    arch, input_size = _backbone_identity(model.backbone)
    state = {
        key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "input_size": input_size,
        "class_names": names,
        "state_dict": state,
        "backbone_model_id": model_id_for(
            arch,
            CHECKPOINT_WEIGHTS,
            backbone_state_from_checkpoint({"state_dict": state}),
            input_size,
        ),
        "meta": json.dumps(meta, sort_keys=True, default=str),
    }
    if embedding_head is not None:
        if not embedding_model_id:
            raise TrainingError("embedding_head needs the embedding_model_id of the features it reads")
        payload["embedding_head"] = {k: v.detach().cpu().contiguous().clone()
                                     for k, v in embedding_head.items()}
        payload["embedding_model_id"] = str(embedding_model_id)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read_checkpoint(data: bytes) -> dict[str, Any]:
    """The checkpoint dict (``meta`` decoded); raises ``TrainingError`` for anything else."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as error:
        raise TrainingError(f"not a readable classifier checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise TrainingError(f"not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r})")
    return {**payload, "meta": json.loads(payload["meta"])}


def backbone_state_from_checkpoint(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's own state dict (``backbone.`` prefix removed, so keys are ``body.*``)."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}


def backbone_checkpoint(data: bytes) -> bytes:
    """The classifier checkpoint's backbone as the flat state dict bytes that
    ``build_backbone(arch, checkpoint=...)`` loads (e.g. to re-embed a wave with it)."""
    buffer = io.BytesIO()
    torch.save(backbone_state_from_checkpoint(read_checkpoint(data)), buffer)
    return buffer.getvalue()


def embedding_head_from_checkpoint(data: bytes) -> EmbeddingHead | None:
    """The checkpoint's stage-1 head, or None for a checkpoint saved without one."""
    payload = read_checkpoint(data)
    head = payload.get("embedding_head")
    if not head:
        return None
    return EmbeddingHead.from_state(payload["class_names"], head, payload["embedding_model_id"])
