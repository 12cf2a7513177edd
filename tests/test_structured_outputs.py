"""Structured outputs through `fusec serve` and the official openai client: JSON schemas,
JSON objects, regexes and choices enforced token by token on the default model, sampled
at temperature 1; bad constraints are 400s."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_helpers import serve_for_module

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "score", "role", "address", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def server():
    yield from serve_for_module("--served-model-name", "smol", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_json_schema_samples_all_validate(client):
    """50 samples at temperature 1 under a nested schema (objects, arrays, enums,
    required fields, bounded numbers, a pattern) all parse and validate."""
    out = client.chat.completions.create(
        model="smol", messages=ASK, n=50, temperature=1.0, seed=7, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert len(out.choices) == 50
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_regex_and_choice_samples_all_match(client):
    pattern = r"[A-Z][a-z]{2,8} [0-9]{2,3}(\.[0-9])?"
    out = client.completions.create(model="smol", prompt="The answer:", n=50, temperature=1.0, seed=3, max_tokens=40,
                                    extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in out.choices), \
        [c.text for c in out.choices]
    options = ["red", "green", "blue sky"]
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Pick a color."}], n=50,
                                         temperature=1.0, seed=3, max_tokens=10, extra_body={"guided_choice": options})
    texts = [c.message.content for c in out.choices]
    assert set(texts) <= set(options) and len(set(texts)) > 1, texts


def test_parse_returns_the_pydantic_object(client):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population: int = pydantic.Field(ge=0, le=100_000_000)  # unbounded, greedy SmolLM2 writes digits forever

    out = client.chat.completions.parse(model="smol", temperature=0, max_tokens=100, response_format=City,
                                        messages=[{"role": "user", "content": "Tell me about Paris as JSON."}])
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_json_object_and_guided_json(client):
    out = client.chat.completions.create(model="smol", messages=ASK, temperature=1.0, seed=1, max_tokens=200, n=4,
                                         response_format={"type": "json_object"})
    for c in out.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.completions.create(model="smol", prompt="Status:", temperature=0, max_tokens=20,
                                    extra_body={"guided_json": json.dumps(schema)})
    assert json.loads(out.choices[0].text) in ({"ok": True}, {"ok": False})


def test_streaming_gives_the_same_text(client):
    args = dict(model="smol", messages=ASK, temperature=1.0, seed=11, max_tokens=200,
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    full = client.chat.completions.create(**args).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **args)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full
    jsonschema.validate(json.loads(full), PERSON)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "garbage"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}}, "schema"),
    ({"guided_json": "[1, 2]"}, "must be an object"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_json": {"type": "no-such-type"}}, "no-such-type"),
    ({"structured_outputs": {"regex": "a("}}, "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "one structured-output constraint"),
    ({"tools": "garbage"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "requires --enable-auto-tool-choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "none"}, "name"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"chat_template_kwargs": {"messages": []}}, "may not set messages"),
])
def test_bad_constraints_are_400s(client, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=5, extra_body=extra)
    body = err.value.response.json()["error"]
    assert body["code"] == 400 and message in body["message"], body
    ok = client.chat.completions.create(model="smol", messages=ASK, max_tokens=3)  # the server is fine
    assert ok.choices[0].message.content is not None


def token_ids(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def test_logit_bias_and_allowed_token_ids(server, client):
    (banana,) = token_ids(server, " banana")
    out = client.completions.create(model="smol", prompt="I like", max_tokens=4, temperature=0,
                                    logit_bias={str(banana): 100})
    assert out.choices[0].text == " banana" * 4
    free = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=1, temperature=0)
    (first,) = token_ids(server, free.choices[0].text)
    banned = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != free.choices[0].text
    allowed = token_ids(server, " yes") + token_ids(server, " no")
    out = client.completions.create(model="smol", prompt="Answer:", max_tokens=6, temperature=1.0, seed=2, n=8,
                                    extra_body={"allowed_token_ids": allowed})
    assert all(re.fullmatch(r"( yes| no)+", c.text) for c in out.choices), [c.text for c in out.choices]


@pytest.mark.parametrize("extra, message", [
    ({"logit_bias": {"abc": 1}}, "token ids"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "[-100, 100]"),
    ({"allowed_token_ids": [10 ** 9]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "must not be empty"),
])
def test_bad_biases_are_400s(client, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt="x", max_tokens=2, extra_body=extra)
    assert message in err.value.response.json()["error"]["message"]

