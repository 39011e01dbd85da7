"""Which network embeds a wave, for every asset that runs it (`embeddings`, the classifier's
teacher and student): the `backbone` asset's decision, or what overrides it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mri_assets.assets.support.partitions import ISOLATED_WAVES
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.wave_store import WaveStore

if TYPE_CHECKING:
    from mri_assets.core.backbone import Backbone


def embedding_backbone(waves: WaveStore, compute: ComputeResource, wave: str,
                       record: dict | None = None) -> tuple[Backbone, str]:
    """The network that embeds `wave` and a line saying where it came from.

    `compute.checkpoint_key` (a classifier checkpoint) wins; the isolated smoke wave keeps the
    compute resource's model; otherwise the wave's `backbone` record (`record`, read from the
    store when not given); with none, the compute resource's weights (seeded or ImageNet)."""
    store = waves.store
    if compute.checkpoint_key:
        from mri_assets.core.training.checkpoint import backbone_checkpoint  # brings torch

        model = compute.build_backbone(checkpoint=backbone_checkpoint(store.get_bytes(compute.checkpoint_key)))
        return model, f"classifier checkpoint {compute.checkpoint_key}"
    if wave in ISOLATED_WAVES:
        record = None
    elif record is None:
        record = waves.backbone_record(wave)
    if record is None or not record.get("checkpoint_key"):
        reason = "no backbone materialization" if record is None else record["reason"]
        return compute.build_backbone(), f"compute weights {compute.weights} ({reason})"
    model = compute.build_backbone(checkpoint=store.get_bytes(record["checkpoint_key"]))
    if model.model_id.split("@")[0] != record["model_id"].split("@")[0]:
        raise ValueError(
            f"{record['checkpoint_key']} gives model {model.model_id} but "
            f"{waves.keys.backbone_record_key(wave)} records {record['model_id']}: "
            f"re-materialize backbone for wave {wave}")
    return model, f"{record['source']} backbone of wave {record['trained_on']}"
