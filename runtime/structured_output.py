"""Structured outputs: constraints on what a sequence may generate, enforced token by
token with llguidance.

A request's constraint (`StructuredOutputsParams`, vLLM's shape: a JSON schema, a
regex, a choice of strings, a grammar, or any JSON object) compiles once into an
llguidance grammar; every sequence under it walks its own `LLMatcher`. Before each
sampling step the matchers write their allowed tokens as a packed bitmask (bit t of
32-bit word t // 32, llguidance's layout), on llguidance's threads while the forward
pass runs; the sampling kernels then drop every token whose bit is clear. After the
draw each matcher consumes its token; one that can take nothing but the end token
finishes its sequence.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fusec.errors import InputError

log = logging.getLogger(__name__)

# JSON as the grammar writes it: no whitespace between tokens. Flexible whitespace lets a
# sampled model pad (or loop on newlines) inside a value it has to close.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_CACHED_GRAMMARS = 64


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on a completion (vLLM's `structured_outputs`): exactly one field set."""

    json: str | None = None  # a JSON schema, serialised
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # llguidance's Lark dialect, or GBNF
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        kinds = [self.json is not None, self.regex is not None, self.choice is not None, self.grammar is not None,
                 self.json_object]
        if sum(kinds) != 1:
            raise InputError("structured outputs take exactly one of json, regex, choice, grammar or json_object")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InputError("a structured-output choice is a non-empty list of strings")

    @classmethod
    def build(cls, *, json: Any = None, regex: str | None = None, choice: Sequence[str] | None = None,
              grammar: str | None = None, json_object: bool = False) -> "StructuredOutputsParams":
        """From API values: a schema as an object or as its JSON text, a choice as any list."""
        return cls(json=None if json is None else _schema_text(json), regex=regex,
                   choice=None if choice is None else tuple(choice), grammar=grammar, json_object=json_object)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (checked when a matcher compiles it)."""
        import llguidance

        if self.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", list(self.choice))
        try:
            return llguidance.grammar_from("grammar", self.grammar or "")
        except Exception as e:  # the GBNF converter raises more than ValueError on malformed text
            raise InputError(f"invalid grammar: {e}") from None


def _schema_text(schema: Any) -> str:
    """A JSON schema given as an object or as its JSON text, serialised (key order kept:
    it is the order properties are generated in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InputError("a JSON schema must be an object")
    return json.dumps(schema)


class GrammarCompiler:
    """Matchers for one tokenizer and vocabulary. Compiled grammars are kept (the last
    MAX_CACHED_GRAMMARS), so a request's n sequences and repeated schemas compile once;
    the server compiles in a worker thread before the engine sees the request."""

    def __init__(self, tokenizer_json: str, vocab: int, end_ids: Sequence[int]) -> None:
        self._tokenizer_json, self.vocab, self.end_ids = tokenizer_json, vocab, sorted(end_ids)
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._executor: Any = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def words(self) -> int:
        """int32 words in one row of the bitmask."""
        return (self.vocab + 31) // 32

    def _ll_tokenizer(self) -> Any:
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab, eos_token=self.end_ids)
        return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The constraint's compiled matcher, at its start (shared: copy it to use it);
        InputError with llguidance's message when the schema, regex or grammar is invalid."""
        import llguidance

        text = params.grammar_text()
        with self._lock:
            matcher = self._compiled.get(text)
            if matcher is not None:
                self._compiled.move_to_end(text)
                return matcher
            tokenizer = self._ll_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)  # drops the GIL while it compiles
        if matcher.is_error():
            raise InputError(f"invalid structured output constraint: {matcher.get_error()}")
        with self._lock:
            self._compiled[text] = matcher
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher for one sequence."""
        return self.compile(params).deep_copy()

    def fill_masks(self, matchers: Sequence[Any]) -> np.ndarray:
        """[len(matchers), words] int32: bit t of row i set when matchers[i] allows token t."""
        from llguidance.numpy import fill_next_token_bitmask_par
        import llguidance

        masks = np.zeros((len(matchers), self.words), np.int32)
        if matchers:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], masks)
        return masks

    def fill_masks_async(self, matchers: Sequence[Any]) -> "Future[np.ndarray]":
        """fill_masks on a background thread (llguidance drops the GIL), to overlap a step."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fusec-grammar")
        return self._pool.submit(self.fill_masks, list(matchers))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
