"""Fixtures shared by the rollout tests."""

from __future__ import annotations

import pytest

from vlrl.models.loading import load_model_and_processor


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Qwen2-VL and its processor, in eval mode (one load per test module)."""
    model, processor = load_model_and_processor(tiny_model_dir)
    model.eval()
    return model, processor
