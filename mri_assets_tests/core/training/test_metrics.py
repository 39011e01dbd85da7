from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.metrics import eval_result_from_predictions, relative_change
from mri_assets_tests.core.training.pattern_fixtures import CLASSES


def test_relative_change_is_the_norm_of_the_difference_over_the_norm_before():
    before = {"layer3.a": torch.tensor([3.0, 4.0]), "layer4.a": torch.tensor([1.0])}
    after = {"layer3.a": torch.tensor([3.0, 4.5]), "layer4.a": torch.tensor([1.0])}
    assert relative_change(before, after, "layer3.") == pytest.approx(0.1)
    assert relative_change(before, after, "layer4.") == 0.0
    with pytest.raises(TrainingError, match="layer9"):
        relative_change(before, after, "layer9.")


def test_macro_f1_and_confusion_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    result = eval_result_from_predictions(y_true, y_pred, CLASSES)
    assert result.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    per_class = f1_score(y_true, y_pred, average=None, labels=range(4))
    assert list(result.per_class_f1.values()) == pytest.approx(list(per_class))
    assert result.confusion.sum() == 200 and result.confusion[1, 2] == np.sum(
        (y_true == 1) & (y_pred == 2)
    )
