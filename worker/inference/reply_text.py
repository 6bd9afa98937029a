"""A reply's text from its generated ids: whole at the end (what is stored), and in pieces
as it is generated (what a job's event stream shows), the pieces always adding up to the whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

log = logging.getLogger("parley.engine")

# Trailing text not yet shown while a reply streams: U+FFFD is what the decoder makes of a
# character whose bytes have not all been generated yet.
_INCOMPLETE = "\ufffd"


def decode_reply(
    tokenizer: Any,
    new_ids: Sequence[int],
    *,
    stop_ids: Collection[int],
    text_markers: Sequence[str] = (),
) -> tuple[str, bool]:
    """Decode generated ids into storable reply text; also say whether the model ended its turn.

    The reply ends before the first stop token (eos or another special token such as a role
    marker) and before the first text role marker, whichever comes first.
    """
    text, stopped, _ = decoded_reply(
        tokenizer, new_ids, stop_ids=stop_ids, text_markers=text_markers
    )
    return text, stopped


def decoded_reply(
    tokenizer: Any,
    new_ids: Sequence[int],
    *,
    stop_ids: Collection[int],
    text_markers: Sequence[str],
) -> tuple[str, bool, list[int] | None]:
    """`decode_reply`, and the ids the text stands for: those before the first stop token,
    None where a text role marker cut the text short of them."""
    stop_at = next((i for i, token in enumerate(new_ids) if token in stop_ids), len(new_ids))
    kept = list(new_ids[:stop_at])
    # The tokenizer's decoder replaces bytes that do not form valid UTF-8 (a character cut off
    # by max_new_tokens, or a random model's byte salad) with U+FFFD.
    text: str = tokenizer.decode(kept, skip_special_tokens=True)
    marker_at = min((i for i in map(text.find, text_markers) if i >= 0), default=None)
    if marker_at is not None:
        text = text[:marker_at]
    stopped = stop_at < len(new_ids) or marker_at is not None
    return _storable(text), stopped, kept if marker_at is None else None


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: no NUL, valid UTF-8 (lone surrogates become '?').

    Surrounding whitespace goes too: the fallback transcript cues "Assistant:", so a reply
    naturally starts with a space, and trailing newlines are the model drifting to a new turn.
    """
    text = text.replace("\x00", "")
    return text.encode("utf-8", errors="replace").decode("utf-8").strip()


class ReplyStream:
    """The reply of a running request, given to `show` in pieces, each final: their
    concatenation is the text `decoded_reply` gives for all the ids at the end, exactly.

    Each `advance` decodes the ids so far as `decoded_reply` does and shows what can no longer
    change: not a trailing character still missing bytes, not trailing whitespace (the stored
    reply is stripped), not a tail that may yet grow into a role marker (the reply is cut
    there)."""

    def __init__(
        self,
        tokenizer: Any,
        show: Callable[[str], None],
        *,
        stop_ids: Collection[int],
        text_markers: Sequence[str],
    ) -> None:
        self._tokenizer = tokenizer
        self._show_piece = show
        self._stop_ids = stop_ids
        self._markers = text_markers
        self.shown = ""
        self._ended = False
        self._decoded = 0  # ids decoded by the last advance

    def advance(self, generated: Sequence[int]) -> None:
        """Show the text that became final since the last call, if any."""
        if self._ended or len(generated) == self._decoded:
            return  # woken with no new token (a cancel check): nothing new to decode
        self._decoded = len(generated)
        text, stopped, _ = decoded_reply(
            self._tokenizer, generated, stop_ids=self._stop_ids, text_markers=self._markers
        )
        if stopped:
            # Cut at a stop token or marker: the reply is complete.
            self._show(text)
            return
        safe = text.rstrip(_INCOMPLETE)
        held = max(
            (
                k
                for marker in self._markers
                for k in range(1, len(marker))
                if safe.endswith(marker[:k])
            ),
            default=0,
        )
        self._show(safe[: len(safe) - held].rstrip())

    def finish(self, reply: str) -> None:
        """Show the rest of `reply` (the stored text) after what was shown."""
        self._show(reply)
        self._ended = True

    def _show(self, text: str) -> None:
        if not text.startswith(self.shown):
            if not self.shown.startswith(text):  # shorter is only a tail held back again
                log.warning("a streamed reply changed after it was shown; not streaming more")
                self._ended = True
            return
        piece, self.shown = text[len(self.shown) :], text
        if piece:
            self._show_piece(piece)
