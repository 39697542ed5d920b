"""The named corpora: where each is published and the SHA-256 it must have."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "texts"  # corpora that ship with charlm: no download


@dataclass(frozen=True)
class Corpus:
    url: str
    sha256: str
    size: int
    packaged: bool = False  # PACKAGED/<name>.txt is read when the cache has no copy


CORPORA: dict[str, Corpus] = {
    "timemachine": Corpus(
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
        size=178_979,
        packaged=True,  # public domain; the corpus a first run meets, so it needs no network
    ),
    "tinyshakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
    ),
}
