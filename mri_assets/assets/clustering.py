"""Clustering for drift monitoring: PCA keeping 90 % of the variance, KMeans at k = 2, 3, 4."""


import dagster as dg
import polars as pl

from mri_assets.assets.support.automation import EAGER
from mri_assets.assets.support.locations import stored_at
from mri_assets.assets.support.monitoring import cluster_gauges, push_figures
from mri_assets.assets.support.partitions import wave_partitions
from mri_assets.assets.support.provenance import dagster_tags, mlflow_run_metadata
from mri_assets.assets.support.reports import png_markdown
from mri_assets.core.clustering import DEFAULT_KS as KS
from mri_assets.core.clustering import PcaModel, cluster_scores, cluster_wave, fit_streaming_pca
from mri_assets.core.expert_labels import align_labels, expert_label_per_image
from mri_assets.core.plots import projection_png
from mri_assets.core.wave_keys import pca_key
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.settings import ClusteringSettings
from mri_assets.resources.wave_io import WAVE_IO_MANAGER
from mri_assets.resources.wave_store import WaveEmbeddings


@dg.asset(
    partitions_def=wave_partitions,
    group_name="drift",
    kinds={"numpy", "mlflow"},
    automation_condition=EAGER,
    io_manager_key=WAVE_IO_MANAGER,
)
def pca_model(
    context: dg.AssetExecutionContext,
    embeddings: WaveEmbeddings,
    object_store: ObjectStore,
    mlflow: MlflowTracking,
    clustering: ClusteringSettings,
) -> dg.Output[PcaModel]:
    """PCA fitted once per wave, streaming over its shards; keeps the fewest components ≥ 90 %."""
    wave = context.partition_key
    shards, ids, model_id = embeddings.shards, embeddings.ids, embeddings.model_id
    context.log.info(f"pca_model {wave}: fitting on {len(ids)} embeddings")
    pca = fit_streaming_pca(shards(), clustering.variance_target,
                            standardize=clustering.standardize)
    context.log.info(f"pca_model {wave}: {pca.n_components} components keep "
                     f"{pca.explained_variance_total:.1%} of the variance")
    data = pca.to_bytes()
    tags = {**dagster_tags(context, mlflow), "model_id": model_id}
    with mlflow.start_wave_run(wave, "pca", tags=tags, new_run=True) as run_id:
        mlflow.log_params(run_id, {"model_id": model_id, "variance_target": clustering.variance_target,
                                   "standardize": clustering.standardize,
                                   "n_components": pca.n_components, "n_slices": len(ids)})
        mlflow.log_metrics(run_id, {"explained_variance": pca.explained_variance_total})
        mlflow.log_artifact_bytes(run_id, "pca.npz", data, artifact_path="models")
    return dg.Output(
        pca,
        metadata={
            "n_components": pca.n_components,
            "explained_variance": round(pca.explained_variance_total, 4),
            "embedding_dim": pca.dim,
            "standardized": pca.standardized,
            "slices": len(ids),
            "model_id": model_id,
            "store_path": stored_at(object_store, pca_key(wave)),
            **mlflow_run_metadata(mlflow, run_id),
        },
    )


@dg.asset(
    partitions_def=wave_partitions,
    group_name="drift",
    kinds={"polars", "mlflow"},
    automation_condition=EAGER,
    io_manager_key=WAVE_IO_MANAGER,
)
def clusters(
    context: dg.AssetExecutionContext,
    embeddings: WaveEmbeddings,
    pca_model: PcaModel,
    label_store: LabelStore,
    mlflow: MlflowTracking,
    clustering: ClusteringSettings,
    metrics: MetricsResource,
) -> dg.Output[pl.DataFrame]:
    """KMeans at k = 2, 3, 4 on the wave's PCA projection; ARI/NMI on the labeled subset."""
    wave = context.partition_key
    shards, ids, model_id = embeddings.shards, embeddings.ids, embeddings.model_id
    pca = pca_model
    context.log.info(f"clusters {wave}: KMeans at k = {', '.join(map(str, KS))} on {len(ids)} "
                     f"slices ({pca.n_components} PCA components)")
    result = cluster_wave(shards, KS, seed=clustering.seed, pca=pca)
    truth = align_labels(ids, expert_label_per_image(label_store.labels_snapshot(None)))
    frame = pl.DataFrame({"image_id": ids, **{f"cluster_k{k}": result.labels[k] for k in KS}})
    scores = {k: cluster_scores(truth, result.labels[k]) for k in KS}
    plotted_truth = [truth[i] for i in result.plot_index]
    png = projection_png(result.plot_coords, result.labels[clustering.drift_k][result.plot_index],
                         plotted_truth, f"wave {wave}: PCA projection")
    tags = {**dagster_tags(context, mlflow), "model_id": model_id}
    with mlflow.start_wave_run(wave, "clusters", tags=tags, new_run=True) as run_id:
        mlflow.log_params(run_id, {"model_id": model_id, "n_components": pca.n_components,
                                   "seed": clustering.seed, "ks": ",".join(map(str, KS))})
        mlflow.log_metrics(run_id, {f"{name}_k{k}": scores[k][name] for k in KS
                                    for name in ("ari", "nmi")})
        mlflow.log_png(run_id, "projection.png", png)
    push_figures(metrics, "clusters", {"wave": wave}, cluster_gauges(wave, scores))
    metadata = {
        "model_id": model_id,
        "n_components": pca.n_components,
        "slices": len(ids),
        "labeled_slices": int(sum(t is not None for t in truth)),
        "drift_k": clustering.drift_k,
        **mlflow_run_metadata(mlflow, run_id),
        "projection": png_markdown("projection", png),
    }
    for k in KS:
        for name in ("ari", "nmi"):
            value = scores[k][name]
            metadata[f"{name}_k{k}"] = float(value) if value is not None else "not computable"
    if scores[clustering.drift_k]["ari"] is None:
        metadata["ari_reason"] = str(scores[clustering.drift_k]["reason"])
    return dg.Output(frame, metadata=metadata)

