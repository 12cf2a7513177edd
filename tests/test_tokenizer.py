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


# Qwen2.5's way of writing tools and tool turns (Hermes-style <tool_call> JSON), trimmed
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}{%- elif message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls %}{% set call = tool_call.function %}
<tool_call>
{"name": "{{ call.name }}", "arguments": {{ call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{%- elif message.role == 'tool' %}
<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def test_tool_turns_reach_the_template_intact(ours, hf_tok):
    """A request's tools, assistant tool_calls (arguments as JSON text, as clients send
    them) and tool results render as transformers renders the same conversation."""
    from fusec.runtime.server.protocol import ChatCompletionRequest, chat_template_args

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}
    body = {"model": "x", "tools": [weather], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "21 C, sunny"},
    ]}
    req = ChatCompletionRequest.model_validate(body)
    turns = [m.template_dict() for m in req.messages]
    tok = Tokenizer(ours.backend, bos_token=ours.bos_token, eos_token=ours.eos_token, chat_template=TOOLS_TEMPLATE)
    got = tok.render_chat(turns, True, **chat_template_args(req.tools, req.chat_template_kwargs))
    hf_messages = [dict(m) for m in body["messages"]]
    hf_messages[2] = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": {"city": "Paris", "unit": "C"}}}]}
    want = hf_tok.apply_chat_template(hf_messages, tools=[weather], chat_template=TOOLS_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
    assert got == want
    assert '"arguments": {"city": "Paris", "unit": "C"}' in got and 'id="call_7"' in got and "get_weather" in got
