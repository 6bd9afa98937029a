"""Load a causal language model and its tokenizer once per worker process.

A Hub id and a local folder (such as one written by ``model_init``) take the same path:
``from_pretrained``. Only the worker imports this module; the API never does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as _hf_logging

# transformers' own annotations are partial (untyped functions, a model that is not its own
# loader's argument type); its objects are handled as Any here rather than scattering ignores.
hf_logging: Any = _hf_logging

# Some configs advertise windows of 128k tokens or more; a prompt that long would exhaust the
# memory of the GPUs Parley targets long before the model's limit, so the window is capped.
MAX_CONTEXT_TOKENS_CAP = 32_768
# Tokenizers without a known limit report a huge sentinel (about 1e30) as model_max_length.
_UNKNOWN_LENGTH = 1_000_000


@dataclass
class LoadedModel:
    model: Any  # PreTrainedModel in eval mode on `device`
    tokenizer: Any  # PreTrainedTokenizerBase
    device: str  # "cpu" or "cuda:0"
    max_context_tokens: int


def load_model(model_id: str, *, device: str | None = None) -> LoadedModel:
    """Load ``model_id`` (Hub id or local folder) for inference on ``device``."""
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_id)
    with quiet_progress_bars():
        model: Any = AutoModelForCausalLM.from_pretrained(model_id, dtype=_dtype_for(device))
    model.to(device)
    model.eval()

    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        max_context_tokens=_context_window(model.config, tokenizer),
    )


def load_tokenizer(model_id: str) -> Any:
    """``model_id``'s tokenizer alone (a worker's side that builds prompts and decodes
    replies holds no model)."""
    with quiet_progress_bars():
        tokenizer: Any = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        # Base models often ship without a pad token; padding positions are masked out, so the
        # eos token is a safe stand-in and keeps the vocabulary (and embeddings) unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_for(device: str) -> torch.dtype:
    if not device.startswith("cuda"):
        # Half precision on a CPU is slower than float32 and less accurate.
        return torch.float32
    index = torch.device(device).index or 0
    # bf16 needs Ampere or newer; older GPUs get fp16, which they run natively.
    major, _minor = torch.cuda.get_device_capability(index)
    return torch.bfloat16 if major >= 8 else torch.float16


def _context_window(config: Any, tokenizer: Any) -> int:
    candidates: list[int] = []
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            candidates.append(value)
            break
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _UNKNOWN_LENGTH:
        candidates.append(tokenizer_limit)
    if not candidates:
        # GPT-2's window: a conservative guess for a model that states none.
        return 1024
    return min(*candidates, MAX_CONTEXT_TOKENS_CAP)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (they are noise in worker logs), then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
