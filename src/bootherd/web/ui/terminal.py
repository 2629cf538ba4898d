"""A serial console's bytes as text a page can show: no I/O, fed chunk by chunk.

What a node prints on its serial line is meant for a terminal: UTF-8 (or not),
escape sequences that move the cursor and change colours (BIOS setup screens,
GRUB menus, systemd's coloured status), carriage returns, bells, backspaces.  A
page shows lines of text, so `TerminalText` keeps the printable characters,
newlines and tabs and drops the rest; an escape sequence, a UTF-8 character or a
CR LF cut between two chunks is completed by the next chunk, never shown half.
"""

from __future__ import annotations

import codecs
import re

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and ESC followed by one
# character (charset selection, keypad modes, ...).  The 8-bit C1 forms are rare on
# serial consoles and are dropped as control characters below.
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])")
# An escape sequence the chunk ends inside of: kept for the next chunk.
_OPEN = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[ -/]*)\Z")
# Control characters other than tab and newline (C0, DEL, C1).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CRLF = re.compile(r"\r+\n")
_OPEN_LIMIT = 256  # a longer unterminated sequence is garbage, not a sequence


class TerminalText:
    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry = ""

    def feed(self, data: bytes) -> str:
        """The text of `data`, given everything fed before."""
        text = self._carry + self._decode.decode(data)
        self._carry = ""
        m = _OPEN.search(text)
        cut = m.start() if m and len(text) - m.start() <= _OPEN_LIMIT else len(text)
        # CR LF may be cut between chunks: one line end, not two.
        cut = len(text[:cut].rstrip("\r"))
        text, self._carry = text[:cut], text[cut:]
        return clean(text)

    def flush(self) -> str:
        """What is held back (a sequence the output ended inside of), as text."""
        text, self._carry = self._carry + self._decode.decode(b"", final=True), ""
        return clean(text)


def clean(text: str) -> str:
    """Printable text of one complete piece of console output: escape sequences and
    control characters dropped, CR LF (and a terminal's CR CR LF) as LF, a lone CR (which
    redraws a line) too."""
    text = _CRLF.sub("\n", _ESCAPE.sub("", text)).replace("\r", "\n")
    return _CONTROL.sub("", text)


def printable(data: bytes) -> str:
    """A whole stored log at once (a tail may start inside a sequence: that part
    shows as the text it is)."""
    t = TerminalText()
    return t.feed(data) + t.flush()
