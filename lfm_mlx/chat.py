"""Multi-turn chat over one ``PromptCache``: each turn prefills only what is new.

Re-tokenizing a conversation does not give back the tokens the model produced (BPE has many
spellings of the same text), so the session keeps, beside the OpenAI-style messages, the exact token
ids behind each rendered prefix; a new prompt is those ids plus the tokenized remainder. Snapshots at
the start of the last user turn and before the last prompt token make ``edit_last`` and
``regenerate`` cheap too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .cache import PromptCache
from .generate import GenerationResponse, stream_generate
from .sample import MAX_PENALTY, MAX_TEMPERATURE, SamplingSettings

MAX_SESSION_BYTES = 20 * 1024 * 1024


def _check_unicode(text: str) -> str:
    """Refuse a lone surrogate: legal in JSON and in Python strings, but not UTF-8, so the tokenizer
    raises on it, and on every later turn if it gets into the history."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate {text[e.start]!r} at character {e.start}, "
                         "which is not valid Unicode") from None
    return text


_Text = Annotated[str, AfterValidator(_check_unicode)]


class _Strict(BaseModel):
    # strict: no "0.5" for a number, no true for an integer; forbid: a misspelt field is an error
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Sampling(_Strict):
    """What ``stream_generate`` takes, in the ranges ``SamplingSettings`` accepts."""
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=MAX_PENALTY)
    repetition_context_size: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None

    @field_validator("top_k")
    @classmethod
    def _within_vocabulary(cls, top_k: Optional[int], info: ValidationInfo) -> Optional[int]:
        vocab = info.context["vocab_size"]  # the model's: top_k counts its tokens
        if top_k is not None and top_k > vocab:
            raise ValueError(f"must be at most {vocab} (the vocabulary size), not {top_k}; 0 turns it off")
        return top_k


class _Function(_Strict):
    name: _Text
    arguments: dict[str, Any]


class _ToolCall(_Strict):
    type: Literal["function"]
    function: _Function


class _Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: _Text
    tool_calls: Optional[list[_ToolCall]] = None


class _SavedChat(_Strict):
    """The file ``save`` writes and ``load`` reads."""
    system: Optional[_Text] = None
    tools: Optional[list[dict[str, Any]]] = None
    messages: list[_Message]
    sampling: Optional[_Sampling] = None
    max_kv_size: Optional[int] = Field(None, ge=1)
    kv_bits: Optional[Literal[4, 8]] = None

    @field_validator("tools")
    @classmethod
    def _tools_are_unicode(cls, tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
        _check_unicode(json.dumps(tools, ensure_ascii=False))
        return tools


_EXPECTED = {"model_type": "an object", "dict_type": "an object", "list_type": "a list", "string_type": "a string",
             "int_type": "an integer", "float_type": "a number"}


def _describe(value: Any) -> str:
    """A JSON value as the file's author would name it."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    shown = json.dumps(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _field_error(error: dict) -> str:
    """Pydantic's first complaint as one line: the field's path, then what is wrong with it."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    kind = error["type"]
    if kind in _EXPECTED:
        problem = f"must be {_EXPECTED[kind]}, not {_describe(error['input'])}"
    elif kind == "missing":
        problem = "is missing"
    elif kind == "extra_forbidden":
        known = _Sampling.model_fields if error["loc"][0] == "sampling" else None
        problem = f"unknown setting (known: {', '.join(known)})" if known else "unknown field"
    elif kind == "value_error":
        problem = str(error["ctx"]["error"])
    else:
        problem = f"{error['msg'].replace('Input should be', 'must be')}, not {_describe(error['input'])}"
    return f"{path}: {problem}" if path else problem


def _read_json(path: Path) -> Any:
    """The file's JSON; one clear line for a file too big, not UTF-8 or not JSON."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SESSION_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_SESSION_BYTES:
        raise ValueError(f"{path.name}: over {MAX_SESSION_BYTES // 2**20} MB, too big for a saved chat session")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name}: not a saved chat session: not UTF-8 text (byte offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}: not a saved chat session: not valid JSON "
                         f"({e.msg} at line {e.lineno} column {e.colno})") from None


class ChatSession:
    max_known_prefixes = 16

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools: Optional[list] = None,
                 max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, engine=None,
                 defaults: Optional[SamplingSettings] = None, **sampling):
        """``engine``: a shared (e.g. threaded) ``lfm_mlx.engine.Engine`` to reply through, so that
        several sessions are answered in one batch; by default each reply runs on its own.
        ``defaults``: sampling settings for what ``sampling`` leaves out (the checkpoint's
        ``read_generation_config``); ``sampling``: this session's own, saved with it."""
        self.model, self.tokenizer, self.engine, self.defaults = model, tokenizer, engine, defaults
        self.system, self.tools = system, tools
        self.sampling = sampling
        self.cache = PromptCache(model, max_kv_size=max_kv_size, kv_bits=kv_bits)
        self.messages: list[dict] = []
        self._known: list[tuple[str, list[int]]] = []  # (rendered text, the exact ids behind it)

    @property
    def history(self) -> list[dict]:
        """The conversation, OpenAI-style, system message first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.messages]

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation so far, as the model saw them."""
        return len(self._known[-1][1]) if self._known else 0

    @property
    def max_kv_size(self) -> Optional[int]:
        return self.cache.max_kv_size

    @property
    def window_active(self) -> bool:
        """True once the conversation outgrew the KV window and the oldest turns are rolling out."""
        return bool(self.max_kv_size) and self.context_tokens > self.max_kv_size

    def send(self, content: str, role: str = "user", **sampling) -> Iterator[GenerationResponse]:
        """Add a message (``role="tool"`` feeds a tool result back) and stream the reply."""
        if not isinstance(content, str) or not content.strip():
            raise ValueError("the message is empty")
        if role not in ("user", "tool"):
            raise ValueError(f'role must be "user" or "tool", not {role!r}')
        try:
            _check_unicode(content)
        except ValueError as e:
            raise ValueError(f"the message {e}") from None
        self.messages.append({"role": role, "content": content})
        return self._respond(sampling)

    def regenerate(self, **sampling) -> Iterator[GenerationResponse]:
        """Answer the last message again; its prompt is already cached up to the last token."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise ValueError("nothing to regenerate: the conversation is empty")
        return self._respond(sampling)

    def edit_last(self, content: str, **sampling) -> Iterator[GenerationResponse]:
        """Replace the last user message and answer it; everything before it stays cached."""
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        if not self.messages:
            raise ValueError("there is no user message to edit")
        self.messages.pop()
        return self.send(content, **sampling)

    def undo(self) -> None:
        """Drop the last exchange (the last user message and what followed it)."""
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        if self.messages:
            self.messages.pop()

    def reset(self) -> None:
        self.messages.clear()
        self._known.clear()
        self.cache.reset()

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        # Replies keep their tool-call markup in the content, so `tool_calls` is not rendered twice.
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, tools=self.tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        """Ids for ``text``: the exact ids of its longest known prefix, then the rest tokenized."""
        best = max((k for k in self._known if text.startswith(k[0])), key=lambda k: len(k[0]), default=None)
        if best is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        rest = text[len(best[0]) :]
        return best[1] + (self.tokenizer.encode(rest, add_special_tokens=False) if rest else [])

    def _remember(self, text: str, ids: list[int]) -> None:
        self._known = [k for k in self._known if k[0] != text] + [(text, list(ids))]
        del self._known[: -self.max_known_prefixes]

    def _respond(self, sampling: dict) -> Iterator[GenerationResponse]:
        history = self.history
        before_last = self._encode(self._render(history[:-1], False)) if len(history) > 1 else []
        prompt_text = self._render(history, True)
        prompt = self._encode(prompt_text)
        self._remember(prompt_text, prompt)
        options = {**self.sampling, **sampling}
        stream = stream_generate(self.model, self.tokenizer, prompt, prompt_cache=self.cache,
                                 checkpoints=[len(before_last)], engine=self.engine, defaults=self.defaults,
                                 **options)
        reply, generated, finished = [], [], None
        try:
            for response in stream:
                reply.append(response.text)
                generated.append(response.token)
                finished = response
                yield response
        finally:
            stream.close()
            if finished is not None:  # failed or stopped before a token: no empty reply in the history
                self._add_reply("".join(reply), finished)
                self._remember(prompt_text + self.tokenizer.decode(generated), prompt + generated)

    def _add_reply(self, content: str, last: GenerationResponse) -> None:
        message = {"role": "assistant", "content": content}
        if last.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in last.tool_calls if "error" not in c
            ]
        self.messages.append(message)

    def save(self, path: Union[str, Path]) -> None:
        """The conversation and settings as JSON, written atomically (the KV state is not saved).
        Raises ValueError, writing nothing, for a session that ``load`` would refuse."""
        data = dict(system=self.system, tools=self.tools, messages=self.messages, sampling=self.sampling,
                    max_kv_size=self.cache.settings["max_kv_size"], kv_bits=self.cache.settings["kv_bits"])
        try:
            _SavedChat.model_validate(data, context={"vocab_size": self.model.args.vocab_size})
        except ValidationError as e:
            raise ValueError(f"cannot save this session: {_field_error(e.errors()[0])}") from None
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, Path], model, tokenizer, **options) -> "ChatSession":
        """A session from ``save``'s JSON; the next message prefills the conversation once. Raises
        ValueError with one line naming the field and the problem for a file ``save`` would not write."""
        path = Path(path)
        try:
            saved = _SavedChat.model_validate(_read_json(path), context={"vocab_size": model.args.vocab_size})
        except ValidationError as e:
            raise ValueError(f"{path.name}: {_field_error(e.errors()[0])}") from None
        messages = [m.model_dump(exclude_none=True) for m in saved.messages]
        sampling = saved.sampling.model_dump(exclude_unset=True) if saved.sampling else {}
        try:
            session = cls(model, tokenizer, system=saved.system, tools=saved.tools, max_kv_size=saved.max_kv_size,
                          kv_bits=saved.kv_bits, **options, **sampling)
        except ValueError as e:  # what the session itself refuses, e.g. a KV window too small
            raise ValueError(f"{path.name}: {e}") from None
        session.messages = [m for m in messages if m["role"] != "system"]
        if session.system is None and messages and messages[0]["role"] == "system":
            session.system = messages[0]["content"]
        return session
