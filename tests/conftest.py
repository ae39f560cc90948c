import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes a shared machine


@pytest.fixture(scope="session")
def tiny_adapter():
    """The built-in architecture with random weights (seed 0): fast, for plumbing tests."""
    from robustvtc.models.builtin import new_builtin

    return new_builtin(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in architecture with random weights (seed 0) saved in Hugging Face format: what a scenario's
    ``model:`` or a Ray worker loads by path."""
    from robustvtc.models.builtin import new_builtin, save_builtin

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_builtin(new_builtin(seed=0), path, {})
    return path


@pytest.fixture(scope="session")
def builtin_adapter():
    """The shipped, trained built-in model loaded through from_pretrained (offline)."""
    from robustvtc.models import load_model

    return load_model("builtin")


@pytest.fixture(scope="session")
def samples():
    from robustvtc.data.synthetic import generate_dataset

    return generate_dataset(20, "test")

