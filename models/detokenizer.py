"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level BPE tokens can end inside a multi-byte character. Each step decodes a short
window of recent tokens twice (without and with the new ones) and emits the
difference only once it no longer ends in U+FFFD, the mark of an incomplete sequence.
The window starts a few tokens back so decoders that treat a leading space specially
see the same context as a full decode does.
"""
from __future__ import annotations

from typing import Sequence

from fusec.models.tokenizer import Tokenizer

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
