import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch

from charlm.data import text as data_mod
from charlm.data.batches import StreamBatches, random_batch, split
from charlm.data.corpora import CORPORA, Corpus
from charlm.data.text import ensure_corpus
from charlm.data.tokenizer import START_BYTE
from charlm.errors import CharlmError


def test_split_by_position_covers_text_in_order():
    d = np.arange(1000, dtype=np.uint8)
    s = split(d, 0.9, 0.05)
    assert [len(s[k]) for k in ("train", "val", "test")] == [900, 50, 50]
    assert np.array_equal(np.concatenate([s["train"], s["val"], s["test"]]), d)


def test_stream_batches_targets_shift_and_lanes_continue():
    stream = np.random.default_rng(0).integers(1, 256, size=10_000).astype(np.uint8)
    b = StreamBatches(stream, batch_size=4, seq_len=50)
    lane_len = len(stream) // 4
    assert b.n_windows == lane_len // 50
    prev_y = None
    rebuilt = [[] for _ in range(4)]
    for k in range(b.n_windows):
        x, y = b.window(k)
        assert x.shape == y.shape == (4, 50) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        if k == 0:
            assert (x[:, 0] == START_BYTE).all()  # each lane starts fresh
        else:
            assert torch.equal(x[:, 0], prev_y[:, -1])  # window k continues window k-1
        prev_y = y
        for lane in range(4):
            rebuilt[lane].extend(y[lane].tolist())
    for lane in range(4):  # each lane is a contiguous piece of the stream, in order
        start = lane * lane_len
        assert rebuilt[lane] == stream[start : start + len(rebuilt[lane])].tolist()


def test_no_window_crosses_a_split():
    # train bytes are 1..99, val 100..199, test 200..255: any crossing shows in the values
    rng = np.random.default_rng(1)
    parts = [rng.integers(1, 100, 9000), rng.integers(100, 200, 500), rng.integers(200, 256, 500)]
    d = np.concatenate(parts).astype(np.uint8)
    s = split(d, 0.9, 0.05)
    b = StreamBatches(s["train"], batch_size=8, seq_len=64)
    for k in range(b.n_windows):
        x, y = b.window(k)
        assert y.max() < 100 and x.max() < 100
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = random_batch(s["val"], 16, 64, g)
        assert ((y >= 100) & (y < 200)).all()
        assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == START_BYTE).all()


def test_too_short_text_is_a_clear_error():
    with pytest.raises(CharlmError, match="too short"):
        StreamBatches(np.zeros(100, dtype=np.uint8), batch_size=8, seq_len=32)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_hash_and_caches(http_server, tmp_path, monkeypatch):
    root, base = http_server
    body = b"a small corpus\n" * 100
    (root / "corpus.txt").write_bytes(body)
    monkeypatch.setitem(CORPORA, "tiny", Corpus(f"{base}/corpus.txt", hashlib.sha256(body).hexdigest(), len(body)))
    cache = tmp_path / "cache"
    heard = []
    path = ensure_corpus("tiny", cache, announce=heard.append)
    assert path == cache / "tiny.txt" and path.read_bytes() == body
    assert heard == [f"downloading tiny from {base}/corpus.txt"]
    (root / "corpus.txt").unlink()  # a second call uses the cache, no network, no announcement
    assert ensure_corpus("tiny", cache, announce=heard.append).read_bytes() == body and len(heard) == 1


def test_download_with_wrong_hash_saves_nothing(http_server, tmp_path, monkeypatch):
    root, base = http_server
    (root / "corpus.txt").write_bytes(b"tampered")
    monkeypatch.setitem(CORPORA, "tiny", Corpus(f"{base}/corpus.txt", "0" * 64, 8))
    cache = tmp_path / "cache"
    with pytest.raises(CharlmError, match="wrong SHA-256"):
        ensure_corpus("tiny", cache)
    assert not (cache / "tiny.txt").exists()


def test_cached_file_with_wrong_hash_names_file_and_both_hashes(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / "timemachine.txt"
    bad.write_text("not the time machine")
    with pytest.raises(CharlmError) as e:
        ensure_corpus("timemachine", cache)
    msg = str(e.value)
    assert str(bad) in msg and CORPORA["timemachine"].sha256 in msg
    assert hashlib.sha256(b"not the time machine").hexdigest() in msg


def test_seeded_reference_corpus_verifies(timemachine_cache):
    path = ensure_corpus("timemachine", timemachine_cache)
    assert path.stat().st_size == CORPORA["timemachine"].size
    assert data_mod.load_bytes(path).dtype == np.uint8


def test_timemachine_ships_with_the_package_and_needs_no_network(tmp_path, monkeypatch):
    """A first run with an empty cache and no network: the packaged copy, checked by its hash."""
    from charlm.data.corpora import PACKAGED

    def no_network(*args, **kwargs):
        raise AssertionError("the packaged corpus must not be downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.chdir(tmp_path)
    path = ensure_corpus("timemachine", tmp_path / "empty_cache")
    assert path == PACKAGED / "timemachine.txt"
    assert path.stat().st_size == CORPORA["timemachine"].size
    assert not (tmp_path / "empty_cache").exists()  # nothing written into the cache
