"""Fixtures shared by the training tests: patterned slices and one fine-tuned run, made once."""

from __future__ import annotations

import pytest
import torch

from mri_assets.core.training.two_stage import train_two_stage
from mri_assets_tests.core.training.pattern_fixtures import FAST, build_model, pattern_data


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """On the shared 2-core machine one intra-op thread is several times faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def patterns():
    """16 training rows (4 a class) and 8 holdout rows."""
    return pattern_data(4, train_seed=1, eval_seed=2)


@pytest.fixture(scope="package")
def more_patterns():
    """60 training rows: enough for stage 2's withheld validation rows (20 %, at least 10)."""
    return pattern_data(15, train_seed=4, eval_seed=5)


@pytest.fixture(scope="package")
def fine_tuned(patterns):
    """One two-stage run shared (read-only) by the tests that need a fine-tuned model."""
    model = build_model()
    report = train_two_stage(model, patterns, FAST)
    return model, report
