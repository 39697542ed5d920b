"""Every cell in every precision, named explicitly: bf16 runs here whatever the CPU (emulated on
CPUs without bf16 instructions: slow, but correct), so no path depends on the machine drawn."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from charlm import cpu
from charlm import plan as plans
from charlm.checkpoint import load_checkpoint, model_from_state
from charlm.commands.train_report import TrainReport
from charlm.config import DataConfig, ModelConfig, PlanConfig, RunConfig, TrainConfig
from charlm.device import Precision
from charlm.inference.explain import explain_steps
from charlm.inference.sampling import sample_text
from charlm.inference.scoring import evaluate_loss
from charlm.interop.onnx import export_onnx
from charlm.model import matmuls
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
    """auto's choice is the rule's for this machine, and says so."""
    precision, reason = plans.auto_precision(torch.device("cpu"))
    assert bf16 == (precision == "bf16") and why == f"auto: {reason}"


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


# The CPU families charlm has met, as /proc/cpuinfo and PyTorch name them, and what auto takes on
# each: the rules are written down (charlm.plan), never timed, so they are tested on any machine.
V3 = {"sse4_2", "popcnt", "ssse3", "cx16", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
FAMILIES = {  # name: (flags, vendor, PyTorch's capability, precision, kernels build, fp32 matmul)
    "Zen 3": (V3, "AuthenticAMD", "AVX2", "fp32", "avx2", "torch"),
    "Zen 4/5": (V4 | {"avx512_bf16"}, "AuthenticAMD", "AVX512", "bf16", "avx512bf16", "onednn"),
    "Ice Lake": (V4, "GenuineIntel", "AVX512", "fp32", "avx512", "torch"),
    "Emerald Rapids, AMX hidden": (V4 | {"avx512_bf16"}, "GenuineIntel", "AVX512", "fp32", "avx512bf16", "torch"),
    "Sapphire Rapids": (V4 | {"avx512_bf16", "amx_tile", "amx_bf16"}, "GenuineIntel", "AVX512", "bf16", "amx", "torch"),
    "Zen 4 under ATEN_CPU_CAPABILITY=avx2": (V4 | {"avx512_bf16"}, "AuthenticAMD", "AVX2", "fp32", "avx2", "torch"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_chooses_by_what_the_cpu_has(family, monkeypatch):
    flags, vendor, capability, precision, build, matmul = FAMILIES[family]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # CI's AVX2 rerun sets it
    flags = frozenset(flags)
    assert plans.auto_precision(torch.device("cpu"), flags, vendor, capability)[0] == precision
    assert cpu.runnable_builds(flags, capability)[-1] == build
    if cpu.is_x86() and matmuls.onednn_matmul() is not None:
        assert plans.auto_matmul(flags, vendor, capability)[0] == matmul


def test_bf16_capped_by_onednn_is_fp32(monkeypatch):
    """CI's AVX2 rerun: ONEDNN_MAX_CPU_ISA=AVX2 makes bf16 emulated, whatever the CPU has."""
    flags, vendor, capability, *_ = FAMILIES["Sapphire Rapids"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision, why = plans.auto_precision(torch.device("cpu"), frozenset(flags), vendor, capability)
    assert precision == "fp32" and "switched off" in why


def test_explicit_precision_is_taken_as_given():
    for name in ("fp32", "bf16"):
        plan, why, _ = plans.resolve(PlanConfig(), "cpu", name)
        assert plan.precision == name and why["precision"] == f"train.precision={name}"


def test_resolving_the_plan_leaves_the_random_stream_alone():
    """Deciding costs no reproducibility: the global generator (dropout's) is where it was."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    plans.resolve(PlanConfig(), "cpu", "auto")
    plans.onednn_lstm_works.cache_clear()
    plans.resolve(PlanConfig(), "cpu", "auto")  # the LSTM probe builds an nn.LSTM: it must not draw
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
