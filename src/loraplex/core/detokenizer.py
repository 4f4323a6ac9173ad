"""IncrementalDetokenizer: output text that grows one token at a time, always valid UTF-8.

Decoding one token alone is wrong for two reasons: byte-level BPE splits a
multi-byte character over several tokens (each decodes to U+FFFD on its own),
and SentencePiece-style decoders drop a word's leading space at the start of a
decode. So each step decodes a short window that starts a few tokens back
(`prefix_offset`), and emits only what the new tokens added beyond the already
emitted part of that window (`read_offset`). While the decoded window ends in
U+FFFD, the character is incomplete: nothing is emitted and the window grows
until it is whole. finish() flushes whatever is left, so the concatenation of
all deltas is the final text.

With skip_special_tokens=False and spaces_between_special_tokens=True (vLLM's defaults for
the second), every added token (a special token such as `</s>`, or a token added to the
vocabulary) is set apart from the text around it by a space, as Hugging Face's slow
tokenizers decode (`hello </s> world`); the window then restarts after it.
"""

from __future__ import annotations

from loraplex.core.tokenizer import Tokenizer

# How many prompt tokens of context the first window starts with.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Added tokens decoded apart, with spaces around them (see the module docstring).
        self._apart = getattr(tokenizer, "added_tokens", {}) \
            if spaces_between_special_tokens and not skip_special_tokens else {}
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._space_next = False
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is incomplete)."""
        if token_id in self._apart:
            before = self._advance(flush=True)
            piece = (" " if self.text else "") + self._apart[token_id]
            self.text += piece
            self._ids, self._prefix_offset, self._read_offset = [], 0, 0
            self._space_next = True
            return before + piece
        self._ids.append(token_id)
        return self._advance(flush=False)

    def finish(self) -> str:
        """Return any held-back tail (an incomplete character decodes to U+FFFD)."""
        return self._advance(flush=True)

    def _advance(self, flush: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset:])
        if not flush and (len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT)):
            return ""
        delta = window_text[len(prefix_text):]
        if self._space_next and delta:
            delta, self._space_next = " " + delta, False
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
