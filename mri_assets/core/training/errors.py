"""The one error every part of classifier training raises."""


class TrainingError(ValueError):
    """Training cannot start or had to stop; the message says what to change."""
