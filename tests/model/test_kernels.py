"""charlm's C++ kernels (charlm/model/kernels/) compute what the PyTorch path does: the GRU's
time loops in fp32 and bf16, the weight gradients, batch-1 and batch-64 decoding, the draw of the
next byte, the dropout mask; and without them (plan.kernels=off, CHARLM_NATIVE=0, no compiler)
everything still runs.

Each check against a reference runs for the build a plan names: by default the one auto picks
here; with CHARLM_TEST_BUILDS=all, every build this CPU runs (CI does both), so that an AVX-512
machine also checks the code an older CPU runs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from charlm import CharLM, ModelConfig, cpu
from charlm import plan as plans
from charlm.inference import sampling
from charlm.model import fused_gru, native
from charlm.model.stepping import Stepper
from helpers import builds_under_test, with_plan


@pytest.fixture(params=builds_under_test())
def build(request):
    """A kernel build under test, with a plan that runs it in use."""
    if native.load(request.param) is None:
        pytest.skip(f"the {request.param} kernels are not available: {native.status(request.param)}")
    with with_plan(kernels=request.param):
        yield request.param


@pytest.fixture
def ops(build):
    return native.load(build)


def _layer_inputs(dtype, seq=7, batch=5, hid=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    gi = torch.randn(seq, batch, 3 * hid, generator=g).to(dtype)
    h0 = torch.randn(batch, hid, generator=g)
    w_hh = (torch.randn(3 * hid, hid, generator=g) / hid**0.5).to(dtype)
    b_hh = torch.randn(3 * hid, generator=g)
    return gi, h0, w_hh, b_hh


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
# at::mm's loop (24 units); the micro-kernels' loop, rows in whole tiles on every thread, and with
# a part tile (13 rows)
@pytest.mark.parametrize("batch,hid", [(5, 24), (96, 64), (13, 32)])
@pytest.mark.parametrize("input_bias", [False, True], ids=["gi-with-bias", "bias-added-in-loop"])
def test_the_time_loops_equal_the_pytorch_loops(ops, dtype, tol, batch, hid, input_bias):
    gi, h0, w_hh, b_hh = _layer_inputs(dtype, batch=batch, hid=hid)
    b_ih = torch.randn(3 * hid, generator=torch.Generator().manual_seed(1)) if input_bias else None
    w_hh_t = w_hh.t().contiguous()
    ours = ops.gru_forward(gi, h0, w_hh_t, b_hh, b_ih)
    theirs = fused_gru.forward_loop(gi, h0, w_hh_t, b_hh, b_ih)
    if input_bias:  # the bias moves the gates: a loop that dropped it would not pass
        assert not torch.allclose(ours[0], ops.gru_forward(gi, h0, w_hh_t, b_hh, None)[0], atol=1e-3)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    out, _, rz, n, ghn = theirs
    d_out = torch.randn_like(out)
    ours = ops.gru_backward(d_out, h0, out, rz, n, ghn, w_hh)
    theirs = fused_gru.backward_loop(d_out, h0, out, rz, n, ghn, w_hh)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        # the bias gradients (the last two) are sums over T * B positions, added in another order
        atol = tol * (gi.size(0) * batch) ** 0.5 if k >= 3 else tol
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=tol)
    assert len(ours) == len(theirs) == 5


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to share the work with")
def test_the_kernels_loops_run_on_every_thread_pytorch_uses(ops):
    """Built without OpenMP, at::parallel_for would run each loop on one thread (the kernels were
    as slow on two cores as on one)."""
    assert ops.threads() == torch.get_num_threads()


# the micro-kernel each build's training loops use for fp32 and bf16 recurrent matmuls
MICRO_KERNELS = {"portable": ("at::mm", "at::mm"), "avx2": ("avx2", "at::mm"), "avx512": ("avx512", "at::mm"),
                 "avx512bf16": ("avx512", "avx512_bf16"), "amx": ("avx512", "at::mm")}


def test_each_build_runs_the_micro_kernels_its_instructions_allow(ops, build):
    """Built without its vector instructions (a lost flag, a lost #if), a build's time loops would
    fall back to one at::mm a step and lose a fifth of a training step's speed. The amx build
    leaves bf16 to oneDNN's at::mm, which uses AMX."""
    assert (ops.recurrent_matmul("float32"), ops.recurrent_matmul("bfloat16")) == MICRO_KERNELS[build]
    if build != "portable":
        assert "recurrent matmuls: fp32 by charlm's" in native.matmuls(build)


def _pair_kernel_built(ops) -> bool:
    """Whether mm_tn's pair kernel is built: the same build as the bf16 micro-kernel's."""
    return ops.recurrent_matmul("bfloat16") == "avx512_bf16"


# whole tiles on both threads; rows past the last whole tile (13, 21); more rows of K than a chunk
# holds; one row; none; a width the tile does not take (40)
@pytest.mark.parametrize("k,m,n", [(300, 96, 64), (300, 13, 32), (333, 21, 64), (1, 8, 32), (0, 8, 32),
                                   (200, 16, 40)])
def test_the_float32_weight_gradient_matmul_equals_the_exact_product_to_float32_rounding(ops, build, k, m, n):
    """mm_tn(a, b) = a^T b in float32: the AVX-512 builds' tile where it takes the width
    (tn_kernel), at::mm elsewhere; both within float32 rounding of the float64 product."""
    g = torch.Generator().manual_seed(k + m)
    a = torch.randn(k, m, generator=g)
    b = torch.randn(n, k, generator=g).t()  # a transposed view: read as its values
    out = ops.mm_tn(a, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    exact = a.double().t() @ b.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * max(1, k) ** 0.5)
    assert ops.tn_kernel("float32", m, n) == (build in cpu.AVX512_BUILDS and n % 32 == 0)


# whole tiles on both threads; a thread's columns not a multiple of 32 (packed 8 at a time); an
# odd K (the last pair half zeros); one row; none; shapes the pair kernel does not take
@pytest.mark.parametrize("k,m,n", [(300, 96, 64), (301, 24, 64), (37, 16, 32), (1, 8, 32), (0, 8, 32),
                                   (200, 12, 64), (200, 16, 40)])
def test_the_weight_gradient_matmul_equals_the_float32_product_of_its_bfloat16_operands(ops, k, m, n):
    """mm_tn(a, b) = a^T b (a weight gradient: positions x features on both sides), float32 out.
    Through the pair kernel (M a multiple of 8, N of 32, where it is built) the sums stay float32
    to the end: within float32 rounding of the exact product, which at::mm's bfloat16 result is
    not; elsewhere at::mm's, rounded once to bfloat16."""
    g = torch.Generator().manual_seed(k)
    a = torch.randn(k, m, generator=g).bfloat16()
    b = torch.randn(n, k, generator=g).bfloat16().t()  # a transposed view: read as its values
    out = ops.mm_tn(a, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    exact = a.double().t() @ b.double()
    pairs = _pair_kernel_built(ops) and m % 8 == 0 and n % 32 == 0
    tol = 1e-5 if pairs else 1e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * max(1, k) ** 0.5)
    if pairs and k >= 37:  # at::mm's rounding to bfloat16 is outside that tolerance
        rounded = (a.t() @ b).double()
        assert not torch.allclose(rounded, exact, rtol=tol, atol=tol * k**0.5)


@pytest.fixture(params=[*builds_under_test(), "off"])
def gru_path(request):
    """fused_gru's time loops in a build of the kernels, or in PyTorch's operations (kernels=off)."""
    if request.param != "off" and native.load(request.param) is None:
        pytest.skip(f"the {request.param} kernels are not available: {native.status(request.param)}")
    with with_plan(kernels=request.param):
        yield request.param


@pytest.mark.parametrize("from_bytes", [False, True], ids=["embeddings", "bytes"])
def test_fused_gru_in_fp32_equals_nn_gru_values_and_gradients(gru_path, from_bytes):
    """From embeddings, or from bytes with the first layer read from a 256-row table
    (GRUTableLayer): what nn.GRU computes on their embeddings, and the same gradients."""
    torch.manual_seed(0)
    gru, embed = torch.nn.GRU(16, 16, 2, batch_first=True), torch.randn(256, 16, requires_grad=True)
    x = torch.randint(0, 256, (4, 70)) if from_bytes else torch.randn(3, 11, 16, requires_grad=True)
    h0 = torch.randn(2, x.size(0), 16, requires_grad=True)
    ref, h_ref = gru(embed[x] if from_bytes else x, h0)
    out, h = fused_gru.fused_gru(gru, x, h0, embed=embed if from_bytes else None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    inputs = [embed if from_bytes else x, h0, *gru.parameters()]
    g_ref = torch.autograd.grad((ref * w).sum() + h_ref.sum(), inputs)
    for a, b in zip(torch.autograd.grad((out * w).sum() + h.sum(), inputs), g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_gru_under_bf16_autocast_stays_within_bf16_rounding_of_nn_gru(gru_path):
    """bf16 matmuls, float32 gates and state: within a few bf16 roundings (2^-8) of fp32 nn.GRU."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(32, 32, 2, batch_first=True)
    x = torch.randn(4, 20, 32, requires_grad=True)
    ref, h_ref = gru(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_gru.can_fuse(gru, x)
        out, h = fused_gru.fused_gru(gru, x, None)
    assert out.dtype == torch.float32 and h.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.03  # bf16 really ran, and only rounded
    w = torch.randn_like(out)
    inputs = [x, *gru.parameters()]
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(torch.autograd.grad((out * w).sum(), inputs), g_ref):
        assert a.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 0.03


@pytest.mark.parametrize("precision,batch,d_model", [("fp32", 1, 48), ("fp32", 64, 48), ("bf16", 1, 48),
                                                     ("bf16", 1, 256), ("bf16", 64, 48), ("bf16", 3, 33)])
def test_the_decoding_step_equals_the_pytorch_step(build, precision, batch, d_model):
    """The kernels' step against PyTorch's operations on the same numbers: float32, or with
    precision="bf16" the weights and inputs rounded to bf16 and float32 sums, which differs from
    float32's step by that rounding and no more."""
    torch.manual_seed(0)
    m = CharLM(ModelConfig(d_model=d_model, n_layers=3)).eval()
    fast, fp32 = Stepper(m, precision), Stepper(m)
    with with_plan(kernels="off"):
        plain = Stepper(m, precision)
    assert fast.native is not None and plain.native is None
    bf16 = precision == "bf16"
    assert fast.native_weights[-1][1].dtype == (torch.bfloat16 if bf16 else torch.float32)  # what the kernels got
    byte, h = torch.randint(0, 256, (batch,)), torch.randn(3, batch, d_model) * 0.5
    with torch.no_grad():
        for _ in range(4):
            lp_fast, h_fast, _ = fast(byte, h)
            lp_plain, h_plain, _ = plain(byte, h)
            torch.testing.assert_close(lp_fast, lp_plain, atol=2e-4 if bf16 else 1e-5, rtol=1e-4 if bf16 else 1e-5)
            torch.testing.assert_close(h_fast, h_plain, atol=2e-5 if bf16 else 1e-5, rtol=1e-5)
            if bf16:
                assert 1e-5 < (lp_fast - fp32(byte, h)[0]).abs().max().item() < 0.03
            byte, h = lp_plain.argmax(-1), h_plain


def test_the_draw_picks_what_the_pytorch_draw_picks(ops):
    """Same generator, same numbers: the same bytes (temperature applied, zero-probability bytes never)."""
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(64, 256, generator=g) * 3, dim=-1)
    log_probs[:, 7] = float("-inf")  # a byte that can never come
    for temperature in (0.5, 1.0, 1.7):
        fast = [ops.draw(log_probs, temperature, torch.Generator().manual_seed(s)) for s in range(20)]
        with with_plan(kernels="off"):
            plain = [sampling.next_byte(log_probs, temperature, None, torch.Generator().manual_seed(s))
                     for s in range(20)]
        same = sum(int((a == b).sum()) for a, b in zip(fast, plain))
        assert same >= 64 * 20 - 1, same  # a draw that lands within float rounding of a boundary may differ
        assert all(int((a == 7).sum()) == 0 for a in fast)


@pytest.mark.parametrize("batch,precision", [(1, "fp32"), (3, "fp32"), (1, "bf16"), (3, "bf16")])
def test_writing_bytes_in_one_kernel_call_gives_what_the_loop_gives(ops, batch, precision):
    """Stepper.write: the same bytes, log-probabilities, state and generator state as drawing and
    stepping byte by byte."""
    torch.manual_seed(0)
    step = Stepper(CharLM(ModelConfig(d_model=48, n_layers=2)).eval(), precision)
    h = torch.randn(2, batch, 48)
    log_probs = torch.log_softmax(torch.randn(batch, 256), dim=-1)
    g_loop, g_once = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        lp, state, loop = log_probs, h, []
        for _ in range(40):
            byte = ops.draw(lp, 0.8, g_loop)
            loop.append(byte)
            lp, state, _ = step(byte, state)
        written, lp_once, state_once = step.write(log_probs, h, 0.8, 40, g_once)
    assert torch.equal(written, torch.stack(loop))
    assert torch.equal(lp_once, lp) and torch.equal(state_once, state)
    assert torch.equal(g_once.get_state(), g_loop.get_state())


def test_a_conversation_written_in_chunks_stops_where_the_byte_loop_stops(build, monkeypatch):
    """Conversation.write with the kernel's chunks and byte by byte: the same text, ending just
    after the stop sequence, and the same state to carry into the next turn."""
    model = CharLM(ModelConfig(d_model=48, n_layers=2))
    torch.manual_seed(0)
    probe = sampling.Conversation(model, generator=torch.Generator().manual_seed(3))
    probe.read(b"t")
    stop = bytes(list(probe.write(80))[50:52])  # two bytes this text writes at 51 and 52, maybe sooner
    turns = {}
    for chunked in (True, False):
        if not chunked:
            monkeypatch.setattr(Stepper, "can_write", lambda *a: False)
        talk = sampling.Conversation(model, generator=torch.Generator().manual_seed(3))
        talk.read(b"t")
        first = bytes(talk.write(80, stop))
        talk.read(b" and")
        turns[chunked] = (first, bytes(talk.write(70)), talk.h)
    assert turns[True][0] == turns[False][0] and turns[True][0].endswith(stop) and len(turns[True][0]) <= 52
    assert turns[True][1] == turns[False][1]
    torch.testing.assert_close(turns[True][2], turns[False][2], atol=0, rtol=0)


def _train_and_sample_in_a_new_process(cwd, **env) -> subprocess.CompletedProcess:
    """A bf16 training step and a sample in a fresh interpreter with env added; prints the
    kernels' status line, then the sample's length."""
    code = (
        "import torch\n"
        "from charlm import CharLM, ModelConfig\n"
        "from charlm.model import native\n"
        "from charlm.inference.sampling import sample_text\n"
        "m = CharLM(ModelConfig(d_model=16, n_layers=2))\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    lp, _ = m(torch.randint(0, 256, (2, 9)))\n"
        "lp.sum().backward()\n"
        "from charlm import plan\n"
        "print(native.status(plan.current().kernels))\n"
        "print(len(sample_text(m.eval(), 'ab', 10, generator=torch.Generator().manual_seed(0))[0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "12"
    return proc


def test_charlm_native_0_plans_without_the_kernels(monkeypatch):
    """CHARLM_NATIVE=0 chooses the path a machine without a compiler takes (which the test below
    runs in a fresh process): auto's kernels are off, and say why."""
    monkeypatch.setenv("CHARLM_NATIVE", "0")
    plan, why, _ = plans.resolve()
    assert plan.kernels == "off" and why["kernels"] == "CHARLM_NATIVE=0 turns the kernels off"
    assert plan.weight_grads == "library" and native.status(plan.kernels) == "PyTorch operations (plan kernels=off)"


def test_a_failed_build_is_one_line_and_training_goes_on(tmp_path):
    """A compiler that fails (here CXX=false, into an empty cache), as on a machine without one: one
    line on stderr, then a bf16 training step and a sample in PyTorch's operations."""
    proc = _train_and_sample_in_a_new_process(tmp_path, CHARLM_CACHE=str(tmp_path / "cache"), CXX="false")
    err = proc.stderr.strip().splitlines()
    build = plans.auto_kernels()[0]
    assert err[0].startswith(f"charlm: compiling the {build} kernels, once")
    assert err[1].startswith(f"charlm: PyTorch operations (the {build} kernels did not build: ")
    assert err[1].endswith("; training and sampling go on, slower") and len(err) == 2, err
    assert proc.stdout.startswith("PyTorch operations (plan kernels=off)")


def test_dropout_keeps_1_minus_p_scaled_repeats_under_a_seed_and_passes_gradients(gru_path):
    """The kernels' hashed mask, or F.dropout's where the kernels are off."""
    from charlm.model.dropout import dropout

    x = torch.randn(64, 100, 32, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 204,800 draws: 0.01 is 10 standard deviations
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.3, training=True), y)  # the seed comes from PyTorch's generator
    assert not torch.equal(dropout(x, 0.3, training=True), y)  # and moves it
    assert dropout(x, 0.3, training=False) is x
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.float() / 0.7)
    # no pattern along the tensor: neighbouring elements and rows are independent
    k = kept.float().flatten()
    assert abs(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()) < 0.02
    rows = kept.float().mean(dim=(1, 2))
    assert rows.std().item() < 0.02


@pytest.mark.system
def test_a_lock_left_by_a_killed_compile_does_not_block_the_next_run(tmp_path):
    """torch's builder leaves `lock` in the build folder when its process dies mid-compile (kill -9,
    a closed terminal, the OOM killer), and every later load waited on it forever; now the build
    holds an flock, which the kernel drops with its holder, and clears such a lock."""
    build = plans.auto_kernels()[0]
    if build == "off" or native.load(build) is None:
        pytest.skip("the kernels are not available here")
    cache = tmp_path / "cache" / "kernels"  # a copy of this build's cache, so the test touches no real one
    for folder in native.cache_dir().glob(f"charlm_{build}_*"):
        shutil.copytree(folder, cache / folder.name)
        (cache / folder.name / "lock").write_text("")  # what a killed compile leaves
    code = f"from charlm.model import native\nprint(native.load({build!r}) is not None)"
    env = {**os.environ, "CHARLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert "compiling" not in proc.stderr  # it loaded the copy, and waited on nothing
    folders = list(cache.iterdir())  # this build's folder, and any of earlier sources
    assert folders and len(list(cache.glob("*/lock"))) == len(folders) - 1  # the loaded one's lock is gone
