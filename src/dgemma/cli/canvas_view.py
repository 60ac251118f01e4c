"""The live canvas of `dgemma generate --show-canvas`: every denoising step's draft, accepted places marked."""

from __future__ import annotations

import math
import shutil
import unicodedata
from typing import TextIO

_ACCEPTED, _PENDING, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
_CONTROL = {"\n": "↵", "\r": "␍", "\t": "→"}


def _visible(text: str) -> str:
    """One draft position as a single-line, printable piece."""
    out = "".join(_CONTROL.get(ch, "·" if unicodedata.category(ch) in ("Cc", "Cf") else ch) for ch in text)
    return out or "∅"


def _width(text: str) -> int:
    """Terminal columns taken by `text` (no escape codes in it)."""
    w = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) == "Cc":
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


class CanvasView:
    """Shows row 0's draft at every denoising step.

    On a terminal the draft is redrawn in place below the text committed so far (accepted positions in
    green, the rest dim), with ANSI cursor movement. Elsewhere each step is one plain line:
    `[canvas C step S  A/N accepted] draft`.
    """

    def __init__(self, out: TextIO, tokenizer, tty: bool):
        self.out, self.tokenizer, self.tty = out, tokenizer, tty
        self.pieces: dict[int, str] = {}
        self.partial = ""  # committed text after the last newline written (what the region redraws)
        self.rows = 0  # terminal rows the drawn region spans (0: nothing drawn)
        if tty:
            self.out.write("\x1b[?25l")  # hide the cursor while animating

    def _piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = _visible(self.tokenizer.decode([token], skip_special_tokens=False))
        return self.pieces[token]

    def text(self, piece: str) -> None:
        """Committed text (streamed output) written above the region."""
        if not piece:
            return
        self.out.write(piece)
        self.partial = piece.rsplit("\n", 1)[1] if "\n" in piece else self.partial + piece
        self.out.flush()

    def step(self, event) -> None:
        tokens, accepted = event.draft[0].tolist(), event.accepted[0].tolist()
        pieces = [self._piece(t) for t in tokens]
        if not self.tty:
            head = f"[canvas {event.canvas_index} step {event.step:>2} {sum(accepted):>4}/{len(tokens)} accepted]"
            self.out.write(f"{head} {''.join(pieces)}\n")
            self.out.flush()
            return
        columns = max(shutil.get_terminal_size().columns, 10)
        height = max(shutil.get_terminal_size().lines, 3)

        def rows(text: str) -> int:
            return max(1, math.ceil(_width(text) / columns))

        draft = "".join(pieces)
        self._erase()
        if rows(self.partial) + rows(draft) >= height:  # too tall to redraw in place: let the text line end
            self.out.write("\n")
            self.partial = ""
        colored, state = [], None
        for piece, a in zip(pieces, accepted):
            if a != state:  # one color change per run of accepted / pending positions
                colored.append(_RESET + (_ACCEPTED if a else _PENDING))
                state = a
            colored.append(piece)
        colored = "".join(colored) + _RESET
        self.out.write("\n" + colored)
        self.rows = rows(self.partial) + rows(draft)
        self.out.flush()

    def _erase(self) -> None:
        """Back to the start of the partial text line, clear below, and rewrite the partial line."""
        if not self.rows:
            return
        up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
        self.out.write("\r" + up + "\x1b[J" + self.partial)
        self.rows = 0

    def commit(self) -> None:
        if self.tty:
            self._erase()
            self.out.flush()

    def close(self) -> None:
        if self.tty:
            self._erase()
            self.out.write("\x1b[?25h")
            self.out.flush()


# -- generate ---------------------------------------------------------------------------------------
