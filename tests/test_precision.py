"""Every cell in every precision, named explicitly: bf16 runs here whatever the CPU (emulated on
CPUs without bf16 instructions: slow, but correct), so no path depends on the machine drawn."""
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from charlm.checkpoint import load_checkpoint, model_from_state
from charlm.commands.train_report import TrainReport
from charlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from charlm.device import Precision, choose_precision
from charlm.inference.explain import explain_steps
from charlm.inference.sampling import sample_text
from charlm.inference.scoring import evaluate_loss
from charlm.interop.onnx import export_onnx
from charlm.model.network import CharLM
from charlm.training.loop import train

CELLS = ["reset_after", "reset_before", "lstm"]


def tiny_config(text_file, out_dir, cell, precision, **train_kw) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="text", path=str(text_file)),
        model=ModelConfig(d_model=16, n_layers=2, dropout=0.1, cell=cell),
        train=TrainConfig(batch_size=4, seq_len=16, max_steps=6, eval_every=3, warmup_steps=2, log_every=3,
                          sample_length=8, precision=precision, **train_kw),
        out_dir=str(out_dir),
    )


def assert_consistent_auto_choice(bf16: bool, why: str) -> None:
    """auto's choice agrees with the reason it gives, whichever CPU ran it: bf16 matmuls no faster
    than fp32's (emulated, or AVX-512 BF16 without AMX) mean fp32 without timing; otherwise bf16
    exactly where its timed step was at least 5% faster."""
    slow = re.fullmatch(r"auto: bf16 matmuls are no faster than fp32 on this CPU \(\d+ µs against \d+ µs in fp32\)",
                        why)
    timed = re.fullmatch(r"auto: a training step took ([\d.]+) ms in fp32, ([\d.]+) ms in bf16", why)
    assert slow or timed, why
    if slow:
        assert not bf16
    else:
        fp32_ms, bf16_ms = map(float, timed.groups())
        assert bf16 == (bf16_ms < 0.95 * fp32_ms) or abs(bf16_ms - 0.95 * fp32_ms) < 0.1  # printed rounded


def float_tensors(tree):
    """Every floating-point tensor in a nested checkpoint structure."""
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in float_tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in float_tensors(v)]
    return []


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_and_precision_trains_samples_evaluates_explains_exports_resumes(
    tmp_path, text_file, capsys, cell, precision
):
    run = tmp_path / "run"
    train(tiny_config(text_file, run, cell, precision), run, report=TrainReport())  # what train.py prints
    header = capsys.readouterr().out
    state = load_checkpoint(run / "last.pt")
    chose = state["precision"]
    assert chose["bf16"] == (precision == "bf16") or precision == "auto"
    assert f"precision: {'bf16' if chose['bf16'] else 'fp32'} (" in header
    if precision == "auto":
        assert_consistent_auto_choice(chose["bf16"], chose["why"])
    else:
        assert chose["why"] == f"train.precision={precision}"
    # weights, optimizer state and the carried hidden state stay float32 whatever ran
    floats = float_tensors([state["model"], state["optimizer"], state["hidden"]])
    assert floats and {t.dtype for t in floats} == {torch.float32}
    assert state["hidden"].shape == (2, 4, 32 if cell == "lstm" else 16)  # the LSTM's [h, c] side by side
    assert state["model_config"]["cell"] == cell

    model = model_from_state(state).eval()
    assert len(sample_text(model, "the ", 12, temperature=0.8, generator=torch.Generator().manual_seed(0))[0]) >= 12
    data = np.frombuffer(text_file.read_bytes()[:2000], dtype=np.uint8)
    loss, n = evaluate_loss(model, data, lanes=2)
    assert n == 2000 and np.isfinite(loss)
    steps = list(explain_steps(model, b"the ", 3))
    gate = "f" if cell == "lstm" else "z"
    assert len(steps) == 3 and all(0 <= s["layers"][0][gate]["mean"] <= 1 for s in steps)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    log_probs, _ = session.run(None, {"byte": np.array([116]), "hidden": model.init_hidden(1).numpy()})
    with torch.no_grad():
        expected, _ = model(torch.tensor([[116]]))
    assert np.allclose(log_probs, expected[:, 0].numpy(), atol=1e-4)

    # resume in the other precision (bf16 <-> fp32): it trains on, and says what it runs
    other = "fp32" if chose["bf16"] else "bf16"
    cfg = tiny_config(text_file, run, cell, other)
    cfg.train.max_steps, cfg.train.resume = 8, str(run / "last.pt")
    train(cfg, run, resume_state=state, report=TrainReport())
    out = capsys.readouterr().out
    assert f"precision: {other} (train.precision={other})" in out and "resumed from step 6" in out
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["step"] == 8 and resumed["precision"]["bf16"] == (other == "bf16")
    assert {t.dtype for t in float_tensors([resumed["model"], resumed["hidden"]])} == {torch.float32}


def test_auto_keeps_its_decision_on_resume(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    train(tiny_config(text_file, run, "reset_after", "auto"), run)
    state = load_checkpoint(run / "last.pt")
    cfg = tiny_config(text_file, run, "reset_after", "auto")
    cfg.train.max_steps = 7
    capsys.readouterr()
    train(cfg, run, resume_state=state, report=TrainReport())
    out = capsys.readouterr().out
    kept = "bf16" if state["precision"]["bf16"] else "fp32"
    assert f"precision: {kept} (auto, as decided when the run started" in out
    assert load_checkpoint(run / "last.pt")["precision"]["bf16"] == state["precision"]["bf16"]


def fake_timer(fp32_s: float, bf16_s: float):
    calls = []

    def measure(bf16: bool) -> float:
        calls.append(bf16)
        return bf16_s if bf16 else fp32_s

    return measure, calls


@pytest.mark.parametrize("fp32_s,bf16_s,expect", [(0.010, 0.005, True), (0.005, 0.010, False),
                                                   (0.0100, 0.0098, False)])  # within 5%: not a clear win
def test_auto_picks_bf16_only_where_a_step_is_faster(fp32_s, bf16_s, expect):
    measure, calls = fake_timer(fp32_s, bf16_s)
    model = CharLM(ModelConfig(d_model=8, n_layers=1))
    native = {torch.float32: 230.0, torch.bfloat16: 50.0}.get  # whatever this CPU is
    p = choose_precision("auto", model, torch.device("cpu"), (2, 4), measure=measure, matmul=native)
    assert p.bf16 is expect
    assert p.why == f"auto: a training step took {fp32_s * 1e3:.1f} ms in fp32, {bf16_s * 1e3:.1f} ms in bf16"
    assert calls.count(True) == calls.count(False) >= 1  # both timed, in turn


def test_auto_keeps_fp32_without_timing_where_bf16_is_emulated():
    measure, calls = fake_timer(0.010, 0.001)  # would win, if it were timed
    model = CharLM(ModelConfig(d_model=8, n_layers=1))
    emulated = {torch.float32: 230.0, torch.bfloat16: 42000.0}.get  # an AVX2 CPU's figures
    p = choose_precision("auto", model, torch.device("cpu"), (2, 4), measure=measure, matmul=emulated)
    assert p == Precision(False, "auto: bf16 matmuls are no faster than fp32 on this CPU"
                                 " (42000 µs against 230 µs in fp32)")
    assert calls == []  # the model was never run in emulated bf16
    native = {torch.float32: 230.0, torch.bfloat16: 50.0}.get  # AMX
    assert choose_precision("auto", model, torch.device("cpu"), (2, 4), measure=measure, matmul=native).bf16


def test_explicit_precision_is_taken_as_given_without_timing():
    measure, calls = fake_timer(1.0, 1.0)
    model = CharLM(ModelConfig(d_model=8, n_layers=1))
    for name in ("fp32", "bf16"):
        p = choose_precision(name, model, torch.device("cpu"), (2, 4), measure=measure)
        assert p == Precision(name == "bf16", f"train.precision={name}")
    assert calls == []


def test_auto_leaves_the_random_stream_alone():
    """Deciding costs no reproducibility: the global generator (dropout's) is where it was."""
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=8, n_layers=2, dropout=0.5))
    state = torch.get_rng_state()
    choose_precision("auto", model, torch.device("cpu"), (2, 4))  # real timing, dropout active
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_is_float32_under_autocast_and_close_to_fp32(cell):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=16, n_layers=2, dropout=0.0, cell=cell))
    x = torch.randint(0, 256, (3, 10))
    ref, h_ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, h = model(x)
        again, h2 = model(x, h)  # a bf16-computed state carried into the next window
    assert h.dtype == h2.dtype == torch.float32 and log_probs.dtype == torch.float32
    assert (h - h_ref).abs().max() < 0.05 and (log_probs - ref).abs().max() < 0.1
    assert again.isfinite().all()


@pytest.mark.parametrize("cell", CELLS)
def test_run_header_says_what_runs_each_part(cell):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Precision(False, "").parts(cell, cpu) == "everything float32"
    bf16 = Precision(True, "")
    assert "hidden state float32" in bf16.parts(cell, cpu) and "output layer bf16" in bf16.parts(cell, cpu)
    if cell == "reset_after":  # cuDNN's GRU: autocast would make it fp16, so it stays fp32
        assert "GRU fp32" in bf16.parts(cell, cuda) and "GRU matmuls bf16" in bf16.parts(cell, cpu)
    elif cell == "lstm":  # oneDNN's LSTM in bf16 on the CPU; cuDNN's stays fp32, as the GRU's
        assert "LSTM fp32" in bf16.parts(cell, cuda) and "LSTM bf16" in bf16.parts(cell, cpu)
    else:
        assert "GRU matmuls and gates bf16" in bf16.parts(cell, cuda)
