"""The tokenizer: Hugging Face's, wrapped by mlx-lm's ``TokenizerWrapper`` for streaming detokenization
(it holds back incomplete UTF-8 sequences) and the chat template (``chat_template.jinja``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as _load_wrapper

# Byte-level BPE never cleans up spaces; saying so also silences transformers' warning on every load.
TOKENIZER_OPTIONS = {"clean_up_tokenization_spaces": False}


def load_tokenizer(
    model_path: Union[str, Path], eos_token_ids: Optional[Union[int, list]] = None
) -> TokenizerWrapper:
    model_path = Path(model_path)
    if not (model_path / "tokenizer.json").is_file() and not (model_path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_path}: copy the tokenizer files (tokenizer.json, "
            "tokenizer_config.json, chat_template.jinja) from the original checkpoint"
        )
    return _load_wrapper(model_path, tokenizer_config_extra=TOKENIZER_OPTIONS, eos_token_ids=eos_token_ids)


@lru_cache(maxsize=8)
def max_token_chars(tokenizer) -> int:
    """The most characters one token can cover: a text longer than ``n`` times this holds more than
    ``n`` tokens for sure, so an oversized input is refused without tokenizing megabytes."""
    return max(len(t) for t in tokenizer.get_vocab())
