import torch

from charlm.data.tokenizer import START_BYTE
from charlm.inference.sampling import generate, next_byte, sample_text, stream_text
from helpers import small_model


def test_greedy_is_argmax_and_deterministic():
    m = small_model()
    a = sample_text(m, "the", 30, temperature=0)
    b = sample_text(m, "the", 30, temperature=0)
    assert a == b and a[0].startswith("the")
    lp = torch.log_softmax(torch.randn(4, 256), -1)
    assert torch.equal(next_byte(lp, 0, None, None), lp.argmax(-1))


def test_one_step_per_byte_matches_rerunning_the_whole_sequence():
    m = small_model()
    prompt = b"time"
    steps = [int(b) for b in generate(m, prompt, 15, temperature=0)]
    seq = [START_BYTE, *prompt]
    for expected in steps:  # the quadratic way: re-run everything for each byte
        log_probs, _ = m(torch.tensor([seq]))
        assert int(log_probs[0, -1].argmax()) == expected
        seq.append(expected)


def test_same_seed_same_text_and_batches():
    m = small_model()
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = sample_text(m, "x", 40, temperature=1.0, generator=g(), num_samples=3)
    b = sample_text(m, "x", 40, temperature=1.0, generator=g(), num_samples=3)
    c = sample_text(m, "x", 40, temperature=1.0, generator=torch.Generator().manual_seed(8), num_samples=3)
    assert a == b and len(a) == 3 and a != c


def test_top_k_one_is_greedy():
    m = small_model()
    greedy = sample_text(m, "a", 25, temperature=0)
    k1 = sample_text(m, "a", 25, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy == k1


def test_top_k_keeps_only_the_k_most_likely():
    lp = torch.log_softmax(torch.randn(1, 256), -1)
    allowed = set(torch.topk(lp[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    seen = {int(next_byte(lp, 2.0, 3, g)) for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_sampled_bytes_follow_the_distribution():
    probs = torch.zeros(256)
    probs[[3, 97, 200, 255]] = torch.tensor([0.1, 0.6, 0.3, 0.0])  # byte 255 (the last) has no mass
    lp = torch.log(probs.clamp_min(1e-30)).expand(60000, 256)
    drawn = next_byte(lp, 1.0, None, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=256).double() / len(drawn)
    assert set(drawn.unique().tolist()) == {3, 97, 200}
    assert torch.allclose(counts[[3, 97, 200]], torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)
    # temperature 0.5 squares the probabilities: 1:36:9 of 46
    hot = torch.bincount(next_byte(lp, 0.5, None, torch.Generator().manual_seed(1)), minlength=256).double() / 60000
    assert torch.allclose(hot[[3, 97, 200]], torch.tensor([1, 36, 9], dtype=torch.float64) / 46, atol=0.01)


def test_exact_number_of_new_bytes():
    m = small_model()
    assert len(list(generate(m, b"", 17, temperature=1.0))) == 17
    assert len(list(generate(m, b"abc", 0, temperature=1.0))) == 0


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 252])
    lp = torch.log(probs.clamp_min(1e-30))
    g = torch.Generator().manual_seed(0)
    # top_p values well away from the sums 0.5, 0.8, 0.95, so that float rounding cannot decide
    draws = lambda top_p: {int(next_byte(lp, 1.0, None, g, top_p=top_p)) for _ in range(400)}  # noqa: E731
    assert draws(0.75) == {0, 1}  # 0.5 + 0.3 reaches 0.75: byte 2 and beyond never appear
    assert draws(0.9) == {0, 1, 2}
    assert draws(0.01) == {0}


def test_stop_ends_after_first_occurrence():
    m = small_model()
    full = sample_text(m, "", 60, temperature=0)[0]
    stop = full[20:22]  # a piece the greedy text is known to contain
    cut = sample_text(m, "", 60, temperature=0, stop=stop)[0]
    assert cut == full[: full.index(stop) + len(stop)]
    streamed = "".join(stream_text(m, "", 60, temperature=0, stop=stop))
    assert streamed == cut
    batch = sample_text(m, "", 60, temperature=1.0, stop="e", num_samples=4,
                        generator=torch.Generator().manual_seed(0))
    assert all(t.endswith("e") and t.count("e") == 1 or "e" not in t for t in batch)
