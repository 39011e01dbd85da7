"""mri_assets: a Dagster asset graph from raw MRI in object storage to a retrained classifier."""

__version__ = "0.1.0"
