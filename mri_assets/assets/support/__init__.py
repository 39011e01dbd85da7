"""What the assets share: partitions, automation conditions, pool tags, provenance, metrics.

No asset is declared here; asset modules import from here and never from one another.
"""
