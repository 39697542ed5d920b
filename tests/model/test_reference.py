"""The model against NumPy float64 GRUs and an LSTM written from the equations, and a GRU step done by hand."""
import numpy as np
import pytest
import torch

from charlm import CharLM, ModelConfig
from charlm.model.gru import layer_weights, lstm_step_with_gates, step_with_gates
from charlm.model.reference import flip_update_gate, gru_layer, gru_step, language_model, lstm_step
from helpers import numpy_params, random_model


@pytest.mark.parametrize("cell", ["reset_after", "reset_before"])
def test_model_matches_reference_to_1e6(cell):
    model = random_model(cell)
    tokens = np.random.default_rng(0).integers(0, 256, size=(3, 25))
    with torch.no_grad():
        ours, _ = model(torch.from_numpy(tokens))
    ref = language_model(tokens, numpy_params(model), n_layers=2, cell=cell)
    assert np.abs(ours.numpy() - ref).max() < 1e-6


def test_the_two_cells_are_different_functions():
    a, b = random_model("reset_after"), random_model("reset_before")
    b.load_state_dict(a.state_dict())  # the very same weights
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert (a(x)[0] - b(x)[0]).abs().max() > 1e-3


# A 1-unit GRU, worked by hand. Gate order r, z, n:
#   w_ih = [0.5, -0.5, 1.0], w_hh = [1.0, 1.0, 2.0], b_ih = 0, b_hh = [0, 0, 0.5]; x = 1, then -1.
# Step 1 (h = 0): r = sigmoid(0.5) = 0.6224593, z = sigmoid(-0.5) = 0.3775407
#   reset after:  n = tanh(1 + r * (2*0 + 0.5)) = tanh(1.3112297) = 0.8644710
#   reset before: n = tanh(1 + 2 * (r*0) + 0.5) = tanh(1.5)       = 0.9051483
#   h1 = z*0 + (1 - z) * n = 0.5381698 (after), 0.5634180 (before)
# Step 2 (x = -1) follows the same way: 0.3466295 (after), 0.4396275 (before).
HAND = {"reset_after": [0.5381697616, 0.3466295481], "reset_before": [0.5634179766, 0.4396274986]}
ONE_UNIT = {"w_ih": np.array([[0.5], [-0.5], [1.0]]), "w_hh": np.array([[1.0], [1.0], [2.0]]),
            "b_ih": np.zeros(3), "b_hh": np.array([0.0, 0.0, 0.5])}


@pytest.mark.parametrize("cell", ["reset_after", "reset_before"])
def test_one_unit_gru_by_hand(cell):
    x = np.array([[[1.0], [-1.0]]])
    out, _ = gru_layer(x, np.zeros((1, 1)), ONE_UNIT, cell)
    assert out[0, :, 0] == pytest.approx(HAND[cell], abs=1e-9)
    # and the torch model's own layer gives the same numbers
    model = CharLM(ModelConfig(d_model=1, n_layers=1, cell=cell)).double()
    with torch.no_grad():
        for name, value in ONE_UNIT.items():
            param = name.replace("w_", "weight_").replace("b_", "bias_") + "_l0"
            getattr(model.gru, param).copy_(torch.from_numpy(value))
        y, _ = model.gru(torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64))
    assert y[0, :, 0].tolist() == pytest.approx(HAND[cell], abs=1e-9)


def test_update_gate_orientations_convert_by_negating_z():
    rng = np.random.default_rng(1)
    u, n_in = 5, 4
    w = {"w_ih": rng.normal(size=(3 * u, n_in)), "w_hh": rng.normal(size=(3 * u, u)),
         "b_ih": rng.normal(size=3 * u), "b_hh": rng.normal(size=3 * u)}
    x, h0 = rng.normal(size=(2, 7, n_in)), rng.normal(size=(2, u))
    for cell in ("reset_after", "reset_before"):
        old, _ = gru_layer(x, h0, w, cell, update="old")
        new, _ = gru_layer(x, h0, flip_update_gate(w), cell, update="new")
        assert np.abs(old - new).max() < 1e-12
        unflipped, _ = gru_layer(x, h0, w, cell, update="new")
        assert np.abs(old - unflipped).max() > 1e-3


@pytest.mark.parametrize("cell", ["reset_after", "reset_before"])
def test_step_with_gates_matches_reference(cell):
    model = random_model(cell, d=6, layers=1)
    rng = np.random.default_rng(2)
    x, h = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    ours = step_with_gates(torch.from_numpy(x), torch.from_numpy(h), layer_weights(model.gru, 0), cell)
    w = {k.replace("gru.", "").replace("weight_", "w_").replace("bias_", "b_").replace("_l0", ""): v
         for k, v in numpy_params(model).items() if k.startswith("gru.")}
    ref = gru_step(x, h, w, cell)
    for key in ("h", "r", "z", "n"):
        assert np.abs(ours[key].detach().numpy() - ref[key]).max() < 1e-12


def test_the_lstm_matches_its_reference_and_its_step_with_gates():
    """nn.LSTM (gate blocks i, f, g, o) against the NumPy equations: the whole model, and one step."""
    model = random_model("lstm", d=12, layers=2)
    tokens = np.random.default_rng(0).integers(0, 256, size=(3, 25))
    with torch.no_grad():
        ours, state = model(torch.from_numpy(tokens))
    assert np.abs(ours.numpy() - language_model(tokens, numpy_params(model), n_layers=2, cell="lstm")).max() < 1e-6
    assert state.shape == (2, 3, 24)  # [h, c] side by side
    rng = np.random.default_rng(3)
    x, h, c = rng.normal(size=(3, 12)), rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    weights = layer_weights(model.lstm, 0)
    step = lstm_step_with_gates(torch.from_numpy(x), torch.from_numpy(np.concatenate([h, c], 1)), weights)
    w = dict(zip(("w_ih", "w_hh", "b_ih", "b_hh"), (t.detach().numpy() for t in weights)))
    ref = lstm_step(x, h, c, w)
    for key in ("h", "c", "i", "f", "g", "o"):
        assert np.abs(step[key].detach().numpy() - ref[key]).max() < 1e-12
