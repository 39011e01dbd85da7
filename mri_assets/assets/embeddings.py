"""Embeddings: one float16 vector per slice, per shard, on the GPU pool, tracked by DVC."""

from pathlib import Path

import dagster as dg

from mri_assets.assets.support.automation import EAGER_AFTER_CHECKS
from mri_assets.assets.support.backbones import embedding_backbone
from mri_assets.assets.support.gpu import GPU_POOL, gpu_step_tags
from mri_assets.assets.support.locations import stored_at
from mri_assets.assets.support.monitoring import push_figures, throughput_gauges
from mri_assets.assets.support.partitions import each_shard, wave_and_shard, wave_shard_partitions
from mri_assets.core.progress import Progress
from mri_assets.core.wave_keys import embeddings_key, slice_keys
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.dvc_tracking import DvcTracking
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.wave_io import WAVE_IO_MANAGER
from mri_assets.resources.wave_store import WaveStore


@dg.asset(
    partitions_def=wave_shard_partitions,
    deps=[dg.AssetKey("slices"), dg.AssetKey("gpu_budget"), dg.AssetKey("backbone")],
    group_name="embed",
    kinds={"pytorch", "dvc"},
    io_manager_key=WAVE_IO_MANAGER,
    pool=GPU_POOL,
    op_tags=gpu_step_tags(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
    automation_condition=EAGER_AFTER_CHECKS,
)
@each_shard
def embeddings(
    context: dg.AssetExecutionContext,
    object_store: ObjectStore,
    compute: ComputeResource,
    dvc: DvcTracking,
    metrics: MetricsResource,
) -> dg.Output[dict]:
    """The shard's slices through the wave's backbone (`backbone` asset, or the classifier's when
    `compute.checkpoint_key` is set): `image_id` + float16 vector, in the store and DVC."""
    from mri_assets.core.embed import embed_shard, write_embeddings  # torch: imported by this step

    wave, shard = wave_and_shard(context)
    npy_key, index_key = slice_keys(wave, shard)
    model, backbone_source = embedding_backbone(WaveStore(object_store), compute, wave)
    device, precision, device_note = compute.device_and_precision()
    with Progress(f"embeddings {wave}/{shard:02d}", "images", log=context.log.info) as shown:
        result = embed_shard(
            object_store.local_path(npy_key), object_store.local_path(index_key), model, device,
            precision, compute.batch_size, compute.num_workers, progress=shown,
        )
    key = embeddings_key(wave, shard)
    with object_store.scratch_dir() as scratch:  # swept after a kill, on a local store
        path = write_embeddings(Path(scratch) / Path(key).name, result.image_ids,
                                result.embeddings, model.model_id)
        object_store.put_file(key, path)
        record = dvc.track(path, key)
    context.log.info(f"{wave}/{shard:02d}: {result.images} slices in {result.seconds:.1f} s on {device}")
    push_figures(metrics, "embeddings", {"wave": wave, "shard": f"{shard:02d}"},
                 throughput_gauges(wave, "embedding", result.images, result.seconds))
    return dg.Output(
        {"wave": wave, "shard": shard, "key": key, "count": result.images,
         "model_id": model.model_id, "dim": model.dim},
        metadata={
            "images": result.images,
            "seconds": round(result.seconds, 3),
            "ms_per_image": round(result.ms_per_image, 3),
            "images_per_s": round(result.images / max(result.seconds, 1e-9), 1),
            "device": str(device),
            "device_note": device_note,
            "precision": precision,
            "model_id": model.model_id,
            "backbone_source": backbone_source,
            "dim": model.dim,
            "store_path": stored_at(object_store, key),
            "dvc_path": record.dvc_path,
            "dvc_md5": record.md5,
            "dvc_remote": record.remote,
        },
    )
