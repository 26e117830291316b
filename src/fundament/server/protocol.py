"""Pydantic wire types mirroring OpenAI's API reference, field names and order as OpenAI's.

Requests accept (and ignore) valid OpenAI fields we do not use; any other field is refused with
OpenAI's "Unrecognized request argument supplied". Our extensions are fenced under an
`# --- fundament extensions ---` comment in each type and documented in docs/api.md.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..config import SamplingDefaults
from ..engine.sampling import SamplingParams
from ..errors import InvalidRequestError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI's `seed`


def lone_surrogate(value, where: str = "") -> tuple[str, str] | None:
    """Where in a JSON value a string holds a lone UTF-16 surrogate ("\\udfff" is valid JSON but
    not Unicode, and no tokenizer can encode it): (path such as "[0].content", which character);
    None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, f"U+{ord(value[e.start]):04X} at character {e.start}"
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := lone_surrogate(v, f"{where}[{i}]")) is not None:
                return found
    elif isinstance(value, dict):
        for k, v in value.items():
            if (found := lone_surrogate(str(k), where) or lone_surrogate(v, f"{where}.{k}")) is not None:
                return found
    return None


class RequestPart(BaseModel):
    """A nested object of a request. Unknown keys are dropped: clients send back the messages
    they were given, with fields such as `refusal` or `annotations`."""

    # strict: JSON `true` is not the number 1, nor "3" the number 3, as OpenAI's schema says.
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, v):
        found = lone_surrogate(v)
        if found is not None:  # the server's validation handler names the exact path
            raise PydanticCustomError(
                "lone_surrogate", "contains a lone UTF-16 surrogate ({char})", {"path": found[0], "char": found[1]}
            )
        return v


class RequestBody(RequestPart):
    """A request body: a field that is neither OpenAI's nor one of our documented extensions is
    an error, as at OpenAI, not silently dropped."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- chat -------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Any


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: Any


class FilePart(BaseModel):
    type: Literal["file"]
    file: Any


# Parts OpenAI defines; the serving handler refuses those the model cannot read (all but text).
ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestPart):
    role: Literal["developer", "system", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class StreamOptions(RequestPart):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None


class StructuredOutputs(RequestPart):
    """vLLM's `structured_outputs`: exactly one constraint on the output. Its other keys (backend
    choice, whitespace patterns, structural tags) are refused as unknown, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")  # a JSON schema (object or JSON text)
    regex: Optional[str] = None
    choice: Optional[list[str]] = Field(None, min_length=1)
    grammar: Optional[str] = None  # a Lark grammar (llguidance's dialect)
    json_object: Optional[bool] = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of json, regex, choice, grammar, json_object; got {', '.join(given).replace('json_', 'json') or 'none'}"
            )
        if self.json_object is False:
            raise ValueError("json_object: false constrains nothing; omit structured_outputs instead")
        return self


class SamplingFields(RequestBody):
    """The sampling fields chat and completions share."""

    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = Field(1, ge=1, le=128)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    user: Optional[str] = None
    # --- fundament extensions (vLLM's names; sent by the official client through extra_body) ---
    top_k: Optional[int] = Field(None, ge=-1)  # 0 or -1: off
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)  # drop tokens below min_p x the top token's probability
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=100.0)  # >1 discourages prompt and output tokens
    ignore_eos: Optional[bool] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Union[dict[str, Any], str, None] = None  # vLLM's deprecated names of structured_outputs
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = Field(None, min_length=1)
    guided_grammar: Optional[str] = None

    def to_sampling_params(
        self, defaults: SamplingDefaults, max_tokens: int, vocab_size: int, logprobs: int | None
    ) -> SamplingParams:
        """The engine's SamplingParams for this request: what it leaves out from the model's
        defaults; `max_tokens` already resolved against the context window."""
        bias = {}
        for k, v in (self.logit_bias or {}).items():
            tid = int(k)
            if not 0 <= tid < vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token id {tid} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias"
                )
            bias[tid] = v
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        for k, b in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), not {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {b} for token {k}")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str
    audio: Optional[Any] = None  # refused by the handler when set: no audio output here
    function_call: Optional[Any] = None  # deprecated names of tool_choice and tools: refused with a pointer
    functions: Optional[list[Any]] = None
    logprobs: Optional[bool] = False
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    metadata: Optional[dict[str, str]] = None
    modalities: Optional[list[str]] = None
    parallel_tool_calls: Optional[bool] = None
    prediction: Optional[Any] = None
    prompt_cache_key: Optional[str] = None
    reasoning_effort: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None
    safety_identifier: Optional[str] = None
    service_tier: Optional[str] = None
    store: Optional[bool] = None
    tool_choice: Optional[Any] = None
    tools: Optional[list[dict[str, Any]]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    verbosity: Optional[str] = None
    web_search_options: Optional[Any] = None  # refused by the handler when set: no web search here


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


# ---- completions ------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    best_of: Optional[int] = Field(None, ge=1, le=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None
    # --- fundament extensions: constrained output for plain completions (vLLM's names) ---
    response_format: Optional[dict[str, Any]] = None  # as in chat: json_object or json_schema

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


# ---- embeddings -------------------------------------------------------------------------------


MAX_INPUTS = 2048  # inputs per embeddings or classifications request (OpenAI's limit for embeddings)


class EmbeddingRequest(RequestBody):
    input: Union[
        str,
        Annotated[list[str], Field(max_length=MAX_INPUTS)],
        list[int],
        Annotated[list[list[int]], Field(max_length=MAX_INPUTS)],
    ]
    model: str
    dimensions: Optional[int] = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- models -----------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# ---- classifications (a fundament extension; see docs/classification.md) ------------------------


class ClassificationLabel(RequestPart):
    name: str
    description: Optional[str] = None


class ClassificationExample(RequestPart):
    input: str
    label: str


class ClassificationRequest(RequestBody):
    model: str
    input: Union[str, Annotated[list[str], Field(max_length=MAX_INPUTS)]]
    labels: list[Union[str, ClassificationLabel]]
    instruction: Optional[str] = None
    examples: Optional[list[ClassificationExample]] = None
    k: Optional[Union[int, list[int]]] = None  # a list: an ensemble of prompts, one per k
    selection: Literal["nearest", "random"] = "nearest"
    calibrate: Union[bool, Literal["none", "content_free", "batch"]] = False
    seed: int = 0
    embedding_model: Optional[str] = None
    answer_prefix: str = "Answer:"
    input_prefix: str = ""
    example_format: Literal["list", "turns"] = "list"


class Classification(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]
    examples: list[int] = []


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Classification]
    usage: Usage


# ---- errors -----------------------------------------------------------------------------------


class ErrorObject(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer (errors.py's classes, the server's one handler)."""

    error: ErrorObject
