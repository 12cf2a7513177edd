"""Tokenizers: HF tokenizer.json, or byte-level BPE rebuilt from a GGUF's vocabulary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from fusec.errors import InputError, ModelLoadError, UnsupportedModelError
from fusec.models.chat_template import render_chat

log = logging.getLogger(__name__)

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's `tokenizer.ggml.pre` names -> the matching HF pre-tokenizer."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return _split_then_bytes(LLAMA3_SPLIT)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(QWEN2_SPLIT)
    if pre not in ("default", "gpt2", "gpt-2"):
        log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's", pre)
    return gpt2


class Tokenizer:
    """Encode, decode and chat-template rendering over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # The *_batch forms: tokenizers' encode/decode hold the GIL for the whole call (15 s for
    # a 15 MB prompt here, every other thread frozen, the server's event loop included);
    # the batch forms release it and cost about a microsecond more.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_args: Any) -> str:
        """template_args: the template's extra variables (e.g. `tools`)."""
        if not self.chat_template:
            raise InputError("this model has no chat template")
        return render_chat(self.chat_template, [dict(m) for m in messages],
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_args)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_args: Any) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top (as HF does).
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_args), add_special_tokens=False)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> "Tokenizer":
        """--tokenizer: an HF directory, or a tokenizer.json (its directory's
        tokenizer_config.json, when there is one, gives the special tokens and template)."""
        file = tokenizer_file(path)
        return cls.from_hf_dir(file.parent, file.name)

    @classmethod
    def from_hf_dir(cls, path: Path, file_name: str = "tokenizer.json") -> "Tokenizer":
        try:
            backend = BackendTokenizer.from_file(str(path / file_name))
            cfg_path = path / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except Exception as e:
            raise ModelLoadError(f"{path}: unreadable tokenizer ({e})") from None
        template = cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"{source}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                                              ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3")))
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])

        def token(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos, eos = token("bos"), token("eos")
        single, special = "$A", []
        if meta.get("tokenizer.ggml.add_bos_token") and bos:
            single, special = f"{bos} $A", [(bos, vocab[bos])]
        if meta.get("tokenizer.ggml.add_eos_token") and eos:
            single, special = f"{single} {eos}", special + [(eos, vocab[eos])]
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=meta.get("tokenizer.chat_template"))


def tokenizer_file(path: str | Path) -> Path:
    """--tokenizer's tokenizer.json: the file itself, or the one in that directory."""
    where = Path(path).expanduser()
    file = where if where.is_file() else where / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"tokenizer {path}: neither a tokenizer.json file nor a directory holding one")
    return file


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized by older transformers
        return value.get("content")
    return value
