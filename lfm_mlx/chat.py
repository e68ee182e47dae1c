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
from typing import Iterator, Optional, Union

from .cache import PromptCache
from .generate import GenerationResponse, stream_generate


class ChatSession:
    max_known_prefixes = 16

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools: Optional[list] = None,
                 max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, **sampling):
        self.model, self.tokenizer = model, tokenizer
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
                                 checkpoints=[len(before_last)], **options)
        reply, generated, finished = "", [], None
        try:
            for response in stream:
                reply += response.text
                generated.append(response.token)
                finished = response
                yield response
        finally:
            stream.close()
            message = {"role": "assistant", "content": reply}
            if finished is not None and finished.tool_calls:
                message["tool_calls"] = [
                    {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in finished.tool_calls if "error" not in c
                ]
            self.messages.append(message)
            self._remember(prompt_text + self.tokenizer.decode(generated), prompt + generated)

    def save(self, path: Union[str, Path]) -> None:
        """The conversation and settings as JSON, written atomically (the KV state is not saved)."""
        data = dict(system=self.system, tools=self.tools, messages=self.messages, sampling=self.sampling,
                    max_kv_size=self.cache.settings["max_kv_size"], kv_bits=self.cache.settings["kv_bits"])
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, Path], model, tokenizer) -> "ChatSession":
        """A session from ``save``'s JSON; the next message prefills the conversation once."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            messages = data["messages"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a saved chat session: {e}") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant", "tool", "system")
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f"{path}: messages must be a list of {{role, content}} objects")
        session = cls(model, tokenizer, system=data.get("system"), tools=data.get("tools"),
                      max_kv_size=data.get("max_kv_size"), kv_bits=data.get("kv_bits"),
                      **(data.get("sampling") or {}))
        session.messages = [m for m in messages if m["role"] != "system"]
        if session.system is None and messages and messages[0]["role"] == "system":
            session.system = messages[0]["content"]
        return session
