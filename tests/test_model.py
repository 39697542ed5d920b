import torch

from charlm import CharLM, ModelConfig
from conftest import small_model


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
