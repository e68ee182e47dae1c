"""OpenAI's chat and completions API over the engine: request models, prompts, replies. No HTTP.

Requests are validated by Pydantic models of OpenAI's request bodies (strict types: a string where a
number belongs is an error, not a guess). ``prepare_chat`` / ``prepare_completion`` turn a valid body
into an engine ``Request``: the chat template applied, snapshots at message boundaries for the prefix
cache, max_tokens capped by what is left of the context, and the reply's form enforced by a grammar
where asked: ``response_format`` (a JSON schema, or any JSON object) and ``tool_choice`` "required"
or a named function (a call whose arguments validate against the tool's parameters). ``Reply``
turns the engine's responses into OpenAI's response objects and stream chunks, tool calls included.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constrain import BudgetError, GrammarConstraint, JSONConstraint, SchemaError, tool_call_grammar
from .engine import GenerationResponse, Request
from .generate import message_starts, sampling_settings
from .sample import SamplingSettings
from .tokenizer import max_token_chars
from .tools import TOOL_CALL_START, split_reply, tool_function

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """A request that cannot be served, as OpenAI reports it: ``{"error": {...}}`` with a status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- request bodies ---------------------------------------------------------------------------------

class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM and llama.cpp do: clients send extras (user, metadata, store).
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict] = "{}"  # a JSON string in OpenAI's API; some clients send the object


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _content_where_needed(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Body):
    name: str
    description: Optional[str] = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Body):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_present(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with a schema')
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send several requests for several choices")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self


def parse(model: type[BaseModel], body: Any) -> Any:
    """``model`` validated from a decoded JSON body, or an APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "union[")))
        where = ".".join(p for p in where.split(".") if p not in ("str", "list[TextPart]", "list[str]",
                                                                  "list[int]", "dict", "NamedToolChoice"))
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(f"{where}: {message}" if where else message, param=where or None,
                       code="missing_field" if first["type"] == "missing" else "invalid_value") from None


# --- prompts ----------------------------------------------------------------------------------------

@dataclass
class Limits:
    """What any one request may ask for: ``context`` tokens of prompt and reply together, and at
    most ``max_tokens`` of reply; ``defaults``: the sampling settings for what it leaves out (the
    served checkpoint's generation config)."""

    context: int
    max_tokens: int = 4096
    defaults: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass
class Prepared:
    """An engine request and what shaping its reply needs."""

    request: Request
    tools: Optional[list[dict]] = None  # tool definitions whose calls are parsed from the reply
    logprobs: bool = False
    kind: str = "chat"  # or "completion"


def _template_message(m: Message, i: int) -> dict:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as e:
                    raise APIError(f"messages.{i}.tool_calls.{j}.function.arguments is not JSON: {e.msg}",
                                   param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
            if not isinstance(arguments, dict):
                raise APIError(f"messages.{i}.tool_calls.{j}.function.arguments must be a JSON object",
                               param=f"messages.{i}.tool_calls.{j}.function.arguments")
            calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def _sampling(defaults: SamplingSettings, body: _Sampling):
    try:
        return sampling_settings(defaults, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                 min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                 presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    except ValueError as e:
        raise APIError(str(e), param=str(e).split(" ")[0]) from None


def _budget(prompt_tokens: int, requested: Optional[int], limits: Limits, param: str) -> int:
    room = limits.context - prompt_tokens
    if room < 1:
        raise APIError(f"This model's maximum context length is {limits.context} tokens, but the prompt is "
                       f"{prompt_tokens} tokens. Shorten the prompt.", param=param, code="context_length_exceeded")
    return min(requested or limits.max_tokens, room, limits.max_tokens)


def _check_length(chars: int, tokenizer, limits: Limits, param: str) -> None:
    """Refuse a text that cannot fit the context before tokenizing it (megabytes take seconds)."""
    most = limits.context * max_token_chars(tokenizer)
    if chars > most:
        raise APIError(f"This model's maximum context length is {limits.context} tokens, but the prompt is "
                       f"{chars:,} characters, more than that many tokens can hold. Shorten the prompt.",
                       param=param, code="context_length_exceeded")


def prepare_chat(body: ChatRequest, model, tokenizer, limits: Limits) -> Prepared:
    """The engine request for a chat completion: everything that can be refused is refused here."""
    messages = [_template_message(m, i) for i, m in enumerate(body.messages)]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    _check_length(sum(len(m["content"]) for m in messages) + len(json.dumps(tools or [])), tokenizer, limits,
                  "messages")
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError("tool_choice needs tools", param="tool_choice")
    if choice == "none":
        tools = None
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except Exception as e:  # the template refuses the conversation (say, roles out of order)
        raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    max_tokens = _budget(len(ids), body.max_completion_tokens or body.max_tokens, limits, "messages")
    processors = []
    vocab = model.args.vocab_size
    if isinstance(choice, NamedToolChoice) or choice == "required":
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        try:
            grammar = tool_call_grammar(tools, name)
        except ValueError as e:
            raise APIError(str(e), param="tools" if name is None else "tool_choice") from None
        processors.append(GrammarConstraint(tokenizer, grammar, vocab_size=vocab, max_tokens=max_tokens))
    elif body.response_format is not None and body.response_format.type != "text":
        schema = body.response_format.json_schema.schema_ if body.response_format.type == "json_schema" \
            else {"type": "object"}
        try:
            processors.append(JSONConstraint(tokenizer, schema, vocab_size=vocab, max_tokens=max_tokens))
        except BudgetError as e:
            raise APIError(str(e), param="max_tokens", code="invalid_value") from None
        except (SchemaError, ValueError) as e:
            raise APIError(f"response_format: {e}", param="response_format.json_schema.schema") from None
    top = body.top_logprobs if body.logprobs else None
    request = Request(ids, max_tokens=max_tokens, sampling=_sampling(limits.defaults, body), seed=body.seed,
                      stop=body.stops(), logits_processors=processors,
                      logprobs=(top or 0) if body.logprobs else None, checkpoints=message_starts(tokenizer, ids))
    return Prepared(request, tools=[tool_function(t) for t in tools] if tools else None,
                    logprobs=bool(body.logprobs))


def prepare_completion(body: CompletionRequest, model, tokenizer, limits: Limits) -> Prepared:
    if isinstance(body.prompt, str):
        _check_length(len(body.prompt), tokenizer, limits, "prompt")
    ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
    if not ids:
        raise APIError("the prompt is empty", param="prompt")
    vocab = model.args.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    max_tokens = _budget(len(ids), body.max_tokens, limits, "prompt")
    request = Request(ids, max_tokens=max_tokens, sampling=_sampling(limits.defaults, body), seed=body.seed,
                      stop=body.stops(), logprobs=body.logprobs)
    return Prepared(request, logprobs=body.logprobs is not None, kind="completion")


# --- replies ----------------------------------------------------------------------------------------

def _usage(last: Optional[GenerationResponse], prompt_tokens: int) -> dict:
    completion = last.generation_tokens if last else 0
    cached = last.cached_tokens if last else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class Reply:
    """One request's reply as it streams: content deltas (tool-call text held back), then the end."""

    prepared: Prepared
    tokenizer: Any
    model_id: str
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    shown: int = 0  # characters of ``text`` already sent as content
    last: Optional[GenerationResponse] = None
    logprobs: list = field(default_factory=list)

    def add(self, r: GenerationResponse) -> str:
        """Take one response; return the content that can be shown now."""
        self.last = r
        self.text += r.text
        if self.prepared.logprobs:
            self.logprobs.append(self._logprob(r))
        if self.prepared.kind == "completion":
            new, self.shown = self.text[self.shown :], len(self.text)
            return new
        safe = len(self.text)
        start = self.text.find(TOOL_CALL_START, self.shown)
        if start >= 0:
            safe = start
        elif self.prepared.tools and self.text[self.shown :].lstrip().startswith("[") and not self.text[: self.shown].strip():
            safe = self.shown  # may be a bare call, [f(x=1)]: known only at the end
        else:  # hold back what could be the start of a tool-call marker
            for k in range(min(len(TOOL_CALL_START), len(self.text) - self.shown), 0, -1):
                if self.text.endswith(TOOL_CALL_START[:k]):
                    safe = len(self.text) - k
                    break
        safe = max(safe, self.shown)
        new, self.shown = self.text[self.shown : safe], safe
        return new

    def finish(self) -> tuple[str, list[dict], str]:
        """(content not yet shown, tool calls, finish reason) once the last response is in."""
        reason = (self.last.finish_reason if self.last else None) or "stop"
        if self.prepared.kind == "completion" or not self.prepared.tools:
            rest, self.shown = self.text[self.shown :], len(self.text)
            return rest, [], reason
        content, calls = split_reply(self.text, self.prepared.tools)
        calls = [c for c in calls if "error" not in c]
        if not calls:
            rest, self.shown = self.text[self.shown :], len(self.text)
            return rest, [], reason
        shown = self.text[: self.shown]
        rest = content[len(shown):] if content.startswith(shown) else ""
        tool_calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in calls]
        return rest, tool_calls, "tool_calls"

    def _logprob(self, r: GenerationResponse) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

        out = entry(r.token, r.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in (r.top_logprobs or [])]
        return out

    def usage(self) -> dict:
        return _usage(self.last, len(self.prepared.request.prompt))

    # --- OpenAI objects ---

    def _completion_logprobs(self) -> dict:
        return {"tokens": [e["token"] for e in self.logprobs], "token_logprobs": [e["logprob"] for e in self.logprobs],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in self.logprobs],
                "text_offset": []}

    def response(self) -> dict:
        """The whole reply as a ``chat.completion`` / ``text_completion`` object."""
        rest, calls, reason = self.finish()
        if self.prepared.kind == "completion":
            choice = {"index": 0, "text": self.text, "finish_reason": reason,
                      "logprobs": self._completion_logprobs() if self.prepared.logprobs else None}
            return {"id": self.id.replace("chatcmpl-", "cmpl-"), "object": "text_completion",
                    "created": self.created, "model": self.model_id, "choices": [choice], "usage": self.usage()}
        content = split_reply(self.text, self.prepared.tools)[0] if calls else self.text
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": reason,
                  "logprobs": {"content": self.logprobs} if self.prepared.logprobs else None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None, logprobs: Optional[list] = None) -> dict:
        """One ``chat.completion.chunk`` / streamed ``text_completion``."""
        if self.prepared.kind == "completion":
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason,
                      "logprobs": None}
            return {"id": self.id.replace("chatcmpl-", "cmpl-"), "object": "text_completion",
                    "created": self.created, "model": self.model_id, "choices": [choice]}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": {"content": logprobs} if logprobs is not None else None}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model_id, "choices": [choice]}

    def usage_chunk(self) -> dict:
        base = self.chunk({})
        base["choices"] = []
        base["usage"] = self.usage()
        return base
