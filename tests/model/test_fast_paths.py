"""The fast paths compute what the plain ones do: fused GRU training, the table and the fused
head, the plan's matmuls, one-byte decoding, bf16."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm import CharLM, ModelConfig, cpu
from charlm import plan as plans
from charlm.config import PlanConfig
from charlm.errors import CharlmError
from charlm.inference.scoring import evaluate_loss
from charlm.model import fused_gru as fused_module
from charlm.model import head as head_module
from charlm.model import matmuls, native
from charlm.model.fused_gru import can_fuse, fused_gru
from charlm.model.stepping import Stepper
from helpers import with_plan

needs_native = pytest.mark.skipif(native.ops() is None, reason="the kernels are off or not available here")


def layer_by_layer(gru, x, h0):
    """nn.GRU's function with dropout between layers drawn as fused_gru draws it (time-major)."""
    seq, finals = x, []
    for k in range(gru.num_layers):
        if k > 0 and gru.training:
            seq = F.dropout(seq.transpose(0, 1).contiguous(), gru.dropout, training=True).transpose(0, 1)
        with torch.random.fork_rng():  # building a layer draws its (replaced) initial weights
            one = torch.nn.GRU(seq.size(-1), gru.hidden_size, 1, batch_first=True).double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(one, f"{name}_l0", getattr(gru, f"{name}_l{k}"))  # the same Parameters: gradients flow
        seq, h = one(seq, h0[k : k + 1])
        finals.append(h[0])
    return seq, torch.stack(finals)


@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (3, 0.0), (2, 0.5), (3, 0.3)])
def test_fused_gru_matches_nn_gru_values_and_gradients(layers, dropout):
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 5, layers, batch_first=True, dropout=dropout).double().train()
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out_ref, h_ref = gru(x, h0) if not dropout else layer_by_layer(gru, x, h0)
    torch.manual_seed(1)  # the same masks
    out, h = fused_gru(gru, x, h0)
    if dropout:  # the masks were really applied: evaluation mode computes something else
        with torch.no_grad():
            assert not torch.allclose(fused_gru(gru.eval(), x, h0)[0], out)
        gru.train()
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(h, h_ref, atol=1e-12)
    w_out, w_h = torch.randn_like(out), torch.randn_like(h)
    inputs = [x, h0, *gru.parameters()]
    g_ref = torch.autograd.grad((out_ref * w_out).sum() + (h_ref * w_h).sum(), inputs)
    g = torch.autograd.grad((out * w_out).sum() + (h * w_h).sum(), inputs)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_model_takes_the_fused_path_on_cpu_in_fp32_and_bf16():
    m = CharLM(ModelConfig(d_model=8, n_layers=1))
    x = torch.zeros(1, 1, 8)
    assert can_fuse(m.gru, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert can_fuse(m.gru, x)
    with torch.autocast("cpu", dtype=torch.float16):  # no fused float16 path
        assert not can_fuse(m.gru, x)
    assert not can_fuse(CharLM(ModelConfig(d_model=8, n_layers=1, cell="reset_before")).gru, x)
    with torch.no_grad():  # evaluation: the kernels where they load, else nn.GRU's own loop
        assert can_fuse(m.gru, x) == (native.ops() is not None)


def test_evaluation_scores_what_nn_gru_scores(text_file, monkeypatch):
    torch.manual_seed(0)
    m = CharLM(ModelConfig(d_model=48, n_layers=2, dropout=0.2))
    data = np.frombuffer(text_file.read_bytes(), np.uint8)[:6000]
    calls = []
    real = fused_module.GRULayer.apply
    monkeypatch.setattr(fused_module.GRULayer, "apply", lambda *a: calls.append(1) or real(*a))
    loss, n = evaluate_loss(m, data, seq_len=64, lanes=8)
    assert bool(calls) == (native.ops() is not None)  # the kernels score where they load
    calls.clear()
    with with_plan(kernels="off"):  # without the kernels, evaluation runs nn.GRU's own loop
        loss_ref, n_ref = evaluate_loss(m, data, seq_len=64, lanes=8)
    assert not calls and n == n_ref and loss == pytest.approx(loss_ref, abs=1e-5)
    assert m.training  # evaluation leaves the model as it found it


def _loss_and_grads(m, x, h, bf16):
    m.zero_grad()
    torch.manual_seed(3)  # the same dropout masks in both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        lp, hn = m(x, h)
    (lp.exp()[..., :7].sum() + hn.sum()).backward()
    return lp.detach(), hn.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_first_layer_read_from_a_table_computes_what_the_embedding_path_does(bf16, monkeypatch):
    torch.manual_seed(0)
    m = CharLM(ModelConfig(d_model=48, n_layers=2, dropout=0.3, embed_dropout=False))
    x, h = torch.randint(0, 256, (8, 40)), torch.randn(2, 8, 48)
    assert m.reads_a_table(x)
    calls = []
    real = fused_module.GRUTableLayer.apply
    monkeypatch.setattr(fused_module.GRUTableLayer, "apply", lambda *a: calls.append(1) or real(*a))
    table = _loss_and_grads(m, x, h, bf16)
    assert calls
    with with_plan(table="off"):
        assert not m.reads_a_table(x)
        direct = _loss_and_grads(m, x, h, bf16)
        exact = _loss_and_grads(m, x, h, False)  # float32 through the embedding path
    assert len(calls) == 1
    assert torch.allclose(table[0], direct[0], atol=1e-6) and torch.allclose(table[1], direct[1], atol=1e-6)
    for name, g in table[2].items():
        if bf16:  # within bf16 rounding of float32's gradient
            err = float((g - exact[2][name]).norm() / exact[2][name].norm())
            assert err < 0.02, name
        else:
            assert torch.allclose(g, direct[2][name], rtol=1e-4, atol=1e-5), name


@needs_native
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_fused_head_computes_what_nn_linear_and_log_softmax_do(bf16, monkeypatch):
    torch.manual_seed(0)  # no dropout: without the kernels F.dropout draws other masks
    m = CharLM(ModelConfig(d_model=48, n_layers=2, dropout=0.0))
    with torch.no_grad():
        m.head.bias.normal_()  # a bias that matters: the fused matmul leaves it to the kernel
    x, h = torch.randint(0, 256, (8, 40)), torch.randn(2, 8, 48)
    calls = []
    real = head_module.LogSoftmaxHead.apply
    monkeypatch.setattr(head_module.LogSoftmaxHead, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _loss_and_grads(m, x, h, bf16)
    assert len(calls) == 1
    with with_plan(kernels="off"):  # nn.Linear and log_softmax (the GRU's loops in PyTorch's operations too)
        plain = _loss_and_grads(m, x, h, bf16)
        exact = _loss_and_grads(m, x, h, False) if bf16 else plain
    assert len(calls) == 1 and fused[0].dtype == plain[0].dtype == torch.float32
    if bf16:  # within bf16 rounding of float32's log-probabilities and gradients
        assert (fused[0] - exact[0]).abs().max() < 0.05
        for name, g in fused[2].items():
            assert float((g - exact[2][name]).norm() / exact[2][name].norm()) < 0.02, name
    else:
        assert torch.allclose(fused[0], plain[0], atol=1e-5) and torch.allclose(fused[1], plain[1], atol=1e-6)
        for name, g in fused[2].items():
            assert torch.allclose(g, plain[2][name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("matmul", ["onednn", "torch"])
@pytest.mark.parametrize("weight_grads", ["charlm", "library"])
def test_the_fp32_training_matmuls_equal_torch_mm_on_every_plan(matmul, weight_grads):
    """plan.matmul and plan.weight_grads choose the code; every choice computes the same products."""
    if matmul == "onednn" and matmuls.onednn_matmul() is None:
        pytest.skip("this PyTorch has no oneDNN fp32 matmul")
    kernels = plans.auto_kernels()[0]
    if weight_grads == "charlm" and kernels not in cpu.AVX512_BUILDS:
        with pytest.raises(CharlmError, match="plan.weight_grads=charlm cannot run here: charlm's weight-gradient"):
            plans.resolve(PlanConfig(weight_grads="charlm"))
        pytest.skip(f"the {kernels} build has no weight-gradient kernels")
    with with_plan(matmul=matmul, weight_grads=weight_grads):
        g = torch.Generator().manual_seed(0)
        x, w, d = (torch.randn(*shape, generator=g) for shape in ((300, 48), (144, 48), (300, 144)))
        torch.testing.assert_close(matmuls.mm(x, w.t()), x @ w.t(), rtol=1e-5, atol=1e-5)  # an input projection
        torch.testing.assert_close(matmuls.mm(d, w), d @ w, rtol=1e-5, atol=1e-5)  # its input gradient
        # its weight gradient: sums of 300 terms
        torch.testing.assert_close(matmuls.mm_tn(d, x), d.t() @ x, rtol=1e-5, atol=1e-4)
        bf = matmuls.mm(x.bfloat16(), w.t().bfloat16())  # bfloat16 stays torch.mm's
        assert bf.dtype == torch.bfloat16 and torch.equal(bf, x.bfloat16() @ w.t().bfloat16())
        # a bfloat16 weight gradient: float32 out (the pair kernel's sums, or torch.mm's bf16 result)
        d_w = matmuls.mm_tn(d.bfloat16(), x.bfloat16())
        assert d_w.dtype == torch.float32
        torch.testing.assert_close(d_w, d.bfloat16().float().t() @ x.bfloat16().float(), rtol=1e-2, atol=1e-1)


def test_the_table_is_read_only_where_nothing_drops_the_embeddings():
    x, short = torch.zeros(8, 32, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)
    dropped = CharLM(ModelConfig(d_model=16, n_layers=2, dropout=0.2))
    assert not dropped.reads_a_table(x)  # each position's input is its own
    assert dropped.eval().reads_a_table(x)  # evaluation drops nothing
    with torch.no_grad():  # and without gradients only the kernels take the fused path
        assert dropped.reads_a_table(x) == (native.ops() is not None)
    kept = CharLM(ModelConfig(d_model=16, n_layers=2, dropout=0.2, embed_dropout=False))
    assert kept.reads_a_table(x) and not kept.reads_a_table(short)  # under 256 positions the rows are fewer
    for cell in ("reset_before", "lstm"):
        assert not CharLM(ModelConfig(d_model=16, n_layers=2, dropout=0.0, cell=cell)).reads_a_table(x)


@pytest.mark.parametrize("cell", ["reset_after", "reset_before", "lstm"])
def test_the_stepper_equals_a_forward_pass_with_or_without_gates(cell):
    torch.manual_seed(0)
    m = CharLM(ModelConfig(d_model=16, n_layers=2, cell=cell)).eval()
    x = torch.randint(0, 256, (4, 9))
    with torch.no_grad():
        whole, h_whole = m(x)
        for gates in (False, True):
            step, h = Stepper(m), m.init_hidden(4)
            for t in range(9):
                log_probs, h, seen = step(x[:, t], h, gates=gates)
                assert torch.allclose(log_probs, whole[:, t], atol=1e-5)
                if gates:  # the last layer's state is what its gates made (the LSTM's: [h, c])
                    last = seen["layers"][-1]
                    assert torch.equal(last.get("state", last["h"]), h[-1]) and len(seen["layers"]) == 2
            assert torch.allclose(h, h_whole, atol=1e-5)


@pytest.mark.slow  # bf16 is emulated on CPUs without AMX: slow there
def test_bf16_loss_stays_within_0_02_nats_of_fp32(text_file):
    """The same 40 steps on the same bytes, autocast bf16 against fp32."""
    data = torch.tensor(list(text_file.read_bytes()), dtype=torch.long)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        m = CharLM(ModelConfig(d_model=32, n_layers=1))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            starts = torch.randint(0, len(data) - 33, (16,), generator=g)
            w = torch.stack([data[s : s + 33] for s in starts.tolist()])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                lp, _ = m(w[:, :-1])
                loss = F.nll_loss(lp.reshape(-1, 256), w[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[bf16] = evaluate_loss(m, np.frombuffer(text_file.read_bytes(), np.uint8), lanes=8)[0]
    assert losses[False] < 3.0  # it learned
    assert abs(losses[True] - losses[False]) < 0.02, losses
