"""The entry points: the `mri-assets` command, the demo, operations scripts and workers."""
