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
