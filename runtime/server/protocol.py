"""The OpenAI protocol (plus vLLM's extra sampling fields) as pydantic models. Request
models validate input and describe the API in the OpenAPI schema; unknown request
fields are accepted and ignored, as vLLM does. Response models are what the server
sends, field for field."""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator,
                      model_serializer, model_validator)

from fusec.errors import InputError
from fusec.runtime.sequence import SamplingParams
from fusec.runtime.structured_output import StructuredOutputsParams

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
# strict: JSON's true and false are not token ids 1 and 0
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """A request body. Python's json module lets through what JSON text cannot carry
    (lone UTF-16 surrogate escapes such as "\\ud800", NaN, Infinity); those are refused
    here, once for every field, before a tokenizer or a response encoder meets them."""

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data: Any) -> Any:
        _check_json_values(data)
        return data


def _check_json_values(data: Any) -> None:
    """ValueError naming the top-level field that holds a string with a lone surrogate
    or a non-finite number (iterative: nesting as deep as json allows does not recurse)."""
    todo: list[tuple[Any, str | None]] = [(data, None)]
    while todo:
        value, field = todo.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{_shown(field)}a string holds a lone UTF-16 surrogate, which is not "
                                     f"valid Unicode") from None
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{_shown(field)}NaN and Infinity are not valid JSON numbers")
        elif isinstance(value, dict):
            todo += [(k, field or k) for k in value]
            todo += [(v, field or k) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, field) for v in value]


def _shown(field: Any) -> str:
    return "" if not isinstance(field, str) else field.encode("utf-8", "backslashreplace").decode("utf-8") + ": "


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(OpenAIModel):
    """vLLM's `structured_outputs`: one of these."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(RequestModel):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's keys) -> bias
    allowed_token_ids: list[TokenId] | None = None
    best_of: int | None = Field(None, ge=1, le=128)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """defaults: the model's generation config, for the sampling fields the request
        leaves unset (its max_tokens cap is the engine's to apply)."""
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise InputError("best_of > n cannot be streamed: the best are known only at the end")
        if self.stream and self.prompt_logprobs is not None:
            raise InputError("`prompt_logprobs` are not available when `stream=True`.")
        defaults = defaults or {}

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return defaults.get(name, fallback) if value is None else value
        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured_outputs_params(), logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids, best_of=self.best_of, prompt_logprobs=self.prompt_logprobs)

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise InputError("logit_bias keys must be token ids") from None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's one constraint, from whichever field gave it; InputError when
        several do or one is malformed."""
        found: list[StructuredOutputsParams] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(StructuredOutputsParams(json_object=True))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise InputError("response_format of type json_schema needs json_schema.schema")
            found.append(StructuredOutputsParams.build(json=fmt.json_schema.json_schema))
        so = self.structured_outputs
        if so is not None:  # StructuredOutputsParams checks that exactly one is given
            found.append(StructuredOutputsParams.build(json=so.json_, regex=so.regex, choice=so.choice,
                                                       grammar=so.grammar, json_object=bool(so.json_object)))
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        found += [StructuredOutputsParams.build(**{kind: value}) for kind, value in guided.items() if value is not None]
        if len(found) > 1:
            raise InputError("give one structured-output constraint: response_format, structured_outputs or one "
                             "guided_* field")
        return found[0] if found else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # the call a tool turn answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self) -> dict[str, Any]:
        """The turn as chat templates read it (HF's convention): tool-call arguments as
        objects where they parse, so a template's `tojson` does not quote them twice."""
        turn: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            turn["name"] = self.name
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": c.type,
                                   "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                  for c in self.tool_calls]
        return turn


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def chat_template_args(tools: list[ChatTool] | None, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Template variables beyond the messages (HF's apply_chat_template extras)."""
    extra = dict(kwargs or {})
    reserved = sorted(set(extra) & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
    if reserved:
        raise InputError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    if tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    return extra


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's: keep each input's last k tokens (-1: the model's context length)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


# -- responses ----------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fusec"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's shape of one prompt_logprobs entry."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one per prompt token, keyed by token id (the prompt's token first, then the top ones);
# None for the first token, which has no context
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """A completion stream chunk; `usage` is sent (null until the last chunk) only with
    stream_options.include_usage."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # vLLM's shape: [] when there are none


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class CompactModel(BaseModel):
    """A stream delta: fields that are None are left out, as OpenAI sends them."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(CompactModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(CompactModel):
    """A call's first delta has its id, type and name; later ones argument fragments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(CompactModel):
    """Only what a chunk adds: the role in the first, then content or tool calls; `{}` when
    none."""
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    """A chat stream chunk; `usage` as in CompletionStreamResponse."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of the little-endian float32 values


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class VersionResponse(BaseModel):
    version: str
