import pytest

from charlm.data.tokenizer import StreamDecoder, decode, encode

TEXTS = ["hello, world", "café déjà vu", "时间机器", "emoji 🙂🚀 end", "", "\x00\n\t"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    data = encode(text)
    assert all(0 <= b <= 255 for b in data)
    assert len(data) == len(text.encode("utf-8"))
    assert decode(data) == text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_whole_decode(text):
    d = StreamDecoder()
    pieces = [d.feed(b) for b in encode(text)] + [d.finish()]
    assert "".join(pieces) == text


def test_partial_sequence_is_held_back():
    d = StreamDecoder()
    rocket = encode("🚀")  # 4 bytes
    assert [d.feed(b) for b in rocket[:3]] == ["", "", ""]
    assert d.feed(rocket[3]) == "🚀"


def test_invalid_bytes_show_as_replacement_character():
    assert decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    d = StreamDecoder()
    out = d.feed(0x61) + d.feed(0xFF) + d.feed(0x62)
    assert out == "a\ufffdb"
    # an unfinished sequence at the end is shown, not dropped
    d = StreamDecoder()
    assert d.feed(0xE6) == ""
    assert d.finish() == "\ufffd"
