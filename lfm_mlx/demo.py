"""The demo model: what the app runs when there is nothing else (``lfm_mlx.resolve`` decides).

The demo is a small LFM2 (the real hybrid: gated short convolutions plus attention) with random weights
from a fixed seed and a byte-level BPE tokenizer trained on a fixed paragraph of text. It is generated
on first use, never downloaded, so the app starts on any machine without network. It writes fluent
nonsense: it shows the app working, not what LFM2 can do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

DEMO_VERSION = "1"
SEED = 20250705

# LFM2's special tokens, at LFM2's ids, so the chat template, EOS and tool markers behave as on the real model.
SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 7

CONFIG = dict(
    architectures=["Lfm2ForCausalLM"], model_type="lfm2", hidden_size=256, num_hidden_layers=6,
    layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention"],
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=768, block_auto_adjust_ff_dim=True,
    block_multiple_of=256, block_ffn_dim_multiplier=1.0, conv_L_cache=3, conv_bias=False, norm_eps=1e-5,
    max_position_embeddings=128_000, rope_theta=1_000_000.0, tie_word_embeddings=False,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)
GENERATION_CONFIG = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         temperature=0.8, top_k=50, top_p=0.95, min_p=0.0, repetition_penalty=1.1)

# LFM2's ChatML layout: system (with the tool list), turns closed by <|im_end|>, tool results wrapped.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set ns.system = messages[0]["content"] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.system = ns.system + ("\\n" if ns.system else "") + "List of tools: <|tool_list_start|>" + (tools | tojson) + "<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system -%}
    {{- "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set content = message["content"] if message["content"] is string else message["content"] | tojson -%}
    {%- if message["role"] == "tool" -%}
        {%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
    {%- endif -%}
    {{- "<|im_start|>" + message["role"] + "\\n" + content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

# What the tokenizer learns its merges from: plain English, numbers and JSON, like what the app shows.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model runs on your own computer, with no server.
Liquid models mix short convolutions with attention, so long conversations stay fast and memory stays low.
Hello! How can I help you today? Here is a short answer, then a longer one with more detail.
Please extract the name, the date, the total amount and the list of items from this invoice.
Invoice number 2024-0117, issued on 12 March 2024 by Northwind Traders, 42 Harbour Street, Lisbon.
Bill to: Maria Santos, Rua das Flores 8, Porto. Items: 3 x paper at 4.50 EUR, 2 x ink at 19.90 EUR.
Subtotal 53.30 EUR, tax 12.26 EUR, total 65.56 EUR. Payment due within 30 days by bank transfer.
Dear team, the meeting moved to Thursday at 10:30 in room B. Bring the report and the budget draft.
John Smith (john.smith@example.com, +1 555 0100) ordered two tickets to Berlin for 14 June.
The patient, a 54 year old woman, reported a mild headache and was given 500 mg of paracetamol.
{"name": "Ada Lovelace", "born": 1815, "skills": ["mathematics", "poetry"], "active": true, "note": null}
{"title": "Weather report", "city": "Paris", "temperature": 21.5, "unit": "celsius", "tags": []}
[{"id": 1, "product": "coffee", "price": 3.2}, {"id": 2, "product": "tea", "price": 2.8}]
What is the weather like in Paris? Let me check the forecast for the next three days.
Tools let a model call functions: search the web, read a file, send an email, or get the time.
Summarise the text below in one sentence, then list the people and places it mentions.
Once upon a time there was a robot who wanted to learn to write poems about the sea and the stars.
This is a demo model with random weights: its words are chosen at random and mean nothing at all.
"""


# --- building the demo checkpoint ---------------------------------------------------------------

def cache_root() -> Path:
    """``$LFM_MLX_CACHE``, else ``~/.cache/lfm_mlx``: converted models and the demo live here."""
    return Path(os.environ.get("LFM_MLX_CACHE") or Path.home() / ".cache" / "lfm_mlx").expanduser()


def demo_dir() -> Path:
    return cache_root() / f"demo-{DEMO_VERSION}"


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", BOS_ID)]
    )
    return tok


def _tokenizer_config() -> dict:
    added = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for i, t in enumerate(SPECIAL_TOKENS)}
    return dict(add_bos_token=True, add_eos_token=False, added_tokens_decoder=added, bos_token="<|startoftext|>",
                eos_token="<|im_end|>", pad_token="<|pad|>", clean_up_tokenization_spaces=False,
                model_max_length=CONFIG["max_position_embeddings"], tokenizer_class="PreTrainedTokenizerFast")


def _silent_ids(vocab: dict) -> list[int]:
    """Tokens the demo never says on its own (their lm_head rows are zero): special tokens, so replies end
    only at max_tokens and never open a tool call, and single bytes other than spaces and punctuation, so
    it writes word pieces and never broken UTF-8. A grammar can still force any of them."""
    byte_of = _byte_level_chars()
    keep = {ord(c) for c in ' \n.,!?"{}[]:'}
    silent = list(range(len(SPECIAL_TOKENS)))
    silent += [i for token, i in vocab.items() if token in byte_of and byte_of[token] not in keep]
    return sorted(silent)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte: printable bytes stand for themselves, the others
    for U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


# Every embedding carries this constant in dimension 0, which survives to the last hidden state, so the
# lm_head weights along it act as per-token biases. These make the demo close strings, numbers, objects and
# arrays at once: a constrained extraction ends in a few dozen tokens instead of running to its budget.
BIAS_DIM_VALUE = 8.0
BIASES = {'"': 9.0, "}": 8.5, "]": 8.5, ",": 8.0}


def _weights(vocab: dict, silent: list[int]) -> dict[str, mx.array]:
    """Random weights in HF key names, each from its own key split off one seed, so they never
    depend on the order tensors are made in."""
    from mlx.utils import tree_flatten

    from .config import ModelArgs
    from .model import Model

    model = Model(ModelArgs.from_dict({**CONFIG, "vocab_size": len(vocab)}))
    params = dict(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(SEED), len(params))
    weights = {}
    for key, name in zip(keys, sorted(params)):
        shape = params[name].shape
        if name.endswith("norm.weight") or "layernorm" in name:
            w = mx.ones(shape)
        elif name.endswith("conv.conv.weight"):
            w = mx.random.normal(shape, key=key) * 0.5
        elif "embed_tokens" in name:
            w = mx.random.normal(shape, key=key)
            w[:, 0] = BIAS_DIM_VALUE
        elif name == "lm_head.weight":
            # Logits with a spread of about 3: varied but not uniform sampling.
            w = mx.random.normal(shape, key=key) * (3.0 / shape[1] ** 0.5)
            w[mx.array(silent)] = 0.0
            for token, bias in BIASES.items():
                w[vocab[token]] = 0.0
                w[vocab[token], 0] = bias / BIAS_DIM_VALUE
        else:
            w = mx.random.normal(shape, key=key) * (0.5 / shape[-1] ** 0.5)
        weights[name] = w.astype(mx.float32)
    return weights


def build_demo(path: Path) -> Path:
    """Write the demo checkpoint (config, weights, tokenizer, chat template) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    vocab = tok.get_vocab()
    weights = _weights(vocab, _silent_ids(vocab))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {**CONFIG, "vocab_size": len(vocab), "lfm_mlx_demo": True}
    files = {
        "config.json": config,
        "generation_config.json": GENERATION_CONFIG,
        "tokenizer_config.json": _tokenizer_config(),
        "special_tokens_map.json": dict(bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"),
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


def ensure_demo() -> Path:
    """The demo checkpoint directory, built on first use. Built in a temporary sibling and renamed
    into place, so a crash or a second process never leaves a half-written model behind."""
    target = demo_dir()
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_demo(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_demo(path: Path) -> bool:
    try:
        return bool(json.loads((Path(path) / "config.json").read_text()).get("lfm_mlx_demo"))
    except (OSError, ValueError):
        return False
