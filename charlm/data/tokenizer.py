"""Text <-> UTF-8 bytes (0..255), and an incremental decoder for streamed output."""
from __future__ import annotations

import codecs
from typing import Iterable

START_BYTE = 0  # fed to the model where a text starts fresh (no prompt, or before the prompt)


def encode(text: str) -> list[int]:
    """UTF-8 bytes of text as ints in 0..255."""
    return list(text.encode("utf-8"))


def decode(data: Iterable[int]) -> str:
    """Bytes to text; invalid UTF-8 shows as U+FFFD."""
    return bytes(data).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns bytes into text as they arrive, holding back an incomplete UTF-8 sequence.

    >>> d = StreamDecoder(); d.feed(0xC3), d.feed(0xA9), d.finish()
    ('', 'é', '')
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, byte: int) -> str:
        """Text that became complete with this byte ('' while a sequence is still open)."""
        return self._decoder.decode(bytes((byte,)))

    def finish(self) -> str:
        """Whatever is still held back (an unfinished sequence becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
