"""Versioned schema of the label store (Alembic). Applied automatically when the store opens."""
