import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_policy():
    """A fresh, untrained character model small enough for unit tests."""
    from thinkling.models.tiny import TinyPolicy

    return TinyPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}, seed=0)
