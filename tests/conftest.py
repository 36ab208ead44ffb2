"""Shared fixtures: tiny models, and the real assets of ../shared when present."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests never reach a hub: a missing model or data set fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test cleanly where the assets are absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real asset {path} is absent")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: they gain nothing from a second one,
    and on a busy 2-core machine competing OpenMP threads make them many times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
