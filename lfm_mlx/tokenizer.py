"""The tokenizer: Hugging Face's, wrapped by mlx-lm's ``TokenizerWrapper`` for streaming detokenization
(it holds back incomplete UTF-8 sequences) and the chat template (``chat_template.jinja``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as _load_wrapper


def load_tokenizer(
    model_path: Union[str, Path], eos_token_ids: Optional[Union[int, list]] = None
) -> TokenizerWrapper:
    model_path = Path(model_path)
    if not (model_path / "tokenizer.json").is_file() and not (model_path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_path}: copy the tokenizer files (tokenizer.json, "
            "tokenizer_config.json, chat_template.jinja) from the original checkpoint"
        )
    return _load_wrapper(model_path, eos_token_ids=eos_token_ids)
