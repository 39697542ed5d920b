import pytest
import torch

from charlm import CharLM, ModelConfig
from charlm.model.network import weight_shapes
from helpers import small_model


def test_shapes_and_log_probs_sum_to_one():
    m = small_model()
    x = torch.randint(0, 256, (3, 7))
    log_probs, h = m(x)
    assert log_probs.shape == (3, 7, 256)
    assert h.shape == (2, 3, 16)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 7), atol=1e-5)


def test_carried_state_equals_one_long_pass():
    m = small_model()
    x = torch.randint(0, 256, (2, 20))
    whole, h_whole = m(x)
    first, h = m(x[:, :12])
    second, h = m(x[:, 12:], h)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)
    assert torch.allclose(h, h_whole, atol=1e-6)


def test_reference_size_is_about_3_4_million_parameters():
    n = CharLM(ModelConfig(d_model=512, n_layers=2)).num_parameters()
    assert 3.3e6 < n < 3.5e6


@pytest.mark.parametrize("cell", ["reset_after", "reset_before", "lstm"])
def test_the_computed_weight_shapes_are_the_models_own(cell):
    """weight_shapes is what a checkpoint is checked against before a model is built from it."""
    config = ModelConfig(d_model=12, n_layers=3, cell=cell)
    built = {name: tuple(t.shape) for name, t in CharLM(config).state_dict().items()}
    assert weight_shapes(config) == built
