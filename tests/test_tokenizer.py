"""Tokenizer ids equal transformers' on the SmolLM2 GGUF vocabulary; HF-directory
tokenizers; chat templates; incremental detokenization."""
from __future__ import annotations

import pytest

from fusec.errors import InputError
from fusec.models.detokenizer import IncrementalDetokenizer
from fusec.models.loader import load_model
from fusec.models.tokenizer import Tokenizer

CORPUS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159265358979.",
    "  leading spaces,\ttabs\t\tand   runs   of    spaces  ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "Ünïcödé: naïve café, Größe, Ελληνικά, русский текст, עברית, العربية",
    "日本語のテキストと中文文本, 한국어 문장",
    "emoji 🦀🎉👩‍💻 and flags 🇫🇷🇯🇵",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special mid-text <|endoftext|> tokens <file_sep> work",
    "code: def f(x):\n    return x**2  # squares\n",
    "1234567890 12 345 6789 0.5 -42 1e10 3,000,000",
    "don't won't I'm you're they've we'll she'd",
    "",
    "   ",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return load_model(str(smollm2_path), load_format="dummy").tokenizer


@pytest.mark.parametrize("text", CORPUS)
def test_ids_identical_to_transformers(ours, hf_tok, text):
    assert ours.encode(text) == hf_tok(text)["input_ids"]
    ids = hf_tok(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf_tok, messages, add_generation_prompt):
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt) == want
    want_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=True)["input_ids"]
    assert ours.encode_chat(messages, add_generation_prompt) == want_ids


def test_hf_directory_tokenizer(hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in CORPUS:
        assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.render_chat(CONVERSATIONS[1]) == hf_tok.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert tok.eos_token_id == hf_tok.eos_token_id


def test_template_errors_are_input_errors(ours):
    bad = Tokenizer(ours.backend, bos_token=None, eos_token=None,
                    chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="roles must alternate"):
        bad.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="no chat template"):
        Tokenizer(ours.backend, bos_token=None, eos_token=None, chat_template=None).render_chat([])


@pytest.mark.parametrize("text", [t for t in CORPUS if t.strip()])
def test_incremental_detokenization_equals_full_decode(ours, text):
    prompt = ours.encode("Context before: ")
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours, prompt)
    pieces = []
    for i, tid in enumerate(ids, 1):
        pieces.append(detok.push(tid))
        full = ours.decode(ids[:i])
        assert "".join(pieces) == detok.text
        if full.endswith("\ufffd"):
            # a character split across tokens is held back, never emitted broken
            assert full.startswith(detok.text) and len(detok.text) < len(full)
            assert "\ufffd" not in detok.text
        else:
            assert detok.text == full
    assert detok.text == ours.decode(ids)


def test_split_characters_are_held_back(ours):
    ids = ours.encode("🦀")
    assert len(ids) > 1, "the crab emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(ours)
    assert [detok.push(t) for t in ids] == [""] * (len(ids) - 1) + ["🦀"]
