"""A checkpoint on its own: safe to load, verified before use, durable, and a failed save.

These drive core.checkpoint directly on a tiny model, so each case costs milliseconds;
tests/test_resume.py and tests/test_crash_safety.py prove the same through train_cls.py.
"""

import random

import numpy as np
import torch

from core import rng


def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(),
            torch.rand(3).tolist())


def test_rng_states_round_trip_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # both cache a second normal draw: it must survive
    torch.save(rng.state(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
