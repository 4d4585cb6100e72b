
import pytest
import torch

# tiny test models run fastest single-threaded (and do not fight the other core)
torch.set_num_threads(1)


@pytest.fixture
def tiny_policy():
    """A fresh, untrained character model small enough for unit tests."""
    from thinkling.models.tiny import TinyPolicy

    return TinyPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}, seed=0)
