"""The one error every reader of a raw object raises when it cannot be turned into slices."""

from __future__ import annotations


class UnreadableImage(ValueError):
    """Raised when an object cannot be decoded into slices; `reason` says what is wrong."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
