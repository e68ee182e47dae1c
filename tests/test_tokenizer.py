"""Our tokenizer loading against transformers.AutoTokenizer on the real LFM2 / LFM2.5 files."""

from __future__ import annotations

import pytest

from conftest import LFM2_350M, LFM25_TOKENIZER, require_shared
from lfm_mlx.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Ünïcödé: 日本語のテキスト, emoji 🙂🚀, Ελληνικά, العربية",
    '{"name": "Ada", "email": "ada@example.com", "amount": 1234.56}',
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "Let me check."},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "user", "content": "Thanks! And 日本?"},
]


@pytest.fixture(params=["LFM2-350M", "LFM2.5-1.2B-Base"], scope="module")
def tokenizers(request):
    require_shared()
    from transformers import AutoTokenizer

    path = {"LFM2-350M": LFM2_350M, "LFM2.5-1.2B-Base": LFM25_TOKENIZER}[request.param]
    return load_tokenizer(path, eos_token_ids=7), AutoTokenizer.from_pretrained(path)


def test_token_ids_equal_transformers(tokenizers):
    ours, theirs = tokenizers
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))


def test_chat_template_renders_equal_to_transformers(tokenizers):
    ours, theirs = tokenizers
    for n in range(2, len(MESSAGES) + 1):
        kwargs = dict(tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(MESSAGES[:n], **kwargs) == theirs.apply_chat_template(MESSAGES[:n], **kwargs)
    rendered = ours.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|startoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_streaming_detokenizer_reproduces_decode_for_multibyte_text(tokenizers):
    ours, _ = tokenizers
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        detok = ours.detokenizer
        detok.reset()
        pieces = []
        for t in ids:
            detok.add_token(t)
            pieces.append(detok.last_segment)
        detok.finalize()
        pieces.append(detok.last_segment)
        assert "".join(pieces) == ours.decode(ids), text
        assert all("\ufffd" not in p for p in pieces), text


def test_missing_tokenizer_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
