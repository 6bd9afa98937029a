"""Build a small GPT-2-shaped chat model offline, for development and benchmarks.

No model can be downloaded where Parley is developed and benchmarked, so this builds one from a
fixed seed: a byte-level BPE tokenizer trained on the bundled ``corpus.txt`` and random GPT-2
weights. The result is an ordinary Hugging Face folder, loaded through the same
``from_pretrained`` path as a real checkpoint. The replies are noise; the costs are real.

Run as ``python -m worker.inference.model_init DIR --size tiny|small [--seed 0]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from worker.inference.loader import quiet_progress_bars

ModelSize = Literal["tiny", "small"]

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

END_OF_TEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
# Order fixes the ids (0..4), so it is part of the deterministic output.
SPECIAL_TOKENS = (END_OF_TEXT, SYSTEM, USER, ASSISTANT, END_OF_TURN)

# Every turn is "<|role|>\n{content}<|end|>\n"; <|end|> is the eos, so generation stops where
# a turn ends. Unknown roles fail loudly rather than being rendered as something the model
# never saw.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{- raise_exception('Unknown chat role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- '<|' ~ message['role'] ~ '|>' }}\n"
    "{{ message['content'] ~ '<|end|>' }}\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|assistant|>' }}\n"
    "{% endif -%}"
)


@dataclass(frozen=True)
class _Shape:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int


# Vocab sizes are what the corpus supports with room to spare: byte-level BPE on ~33 KB of text
# runs out of pairs to merge at about 5,400 tokens, so "small" uses 4,096 rather than padding
# the vocabulary with tokens that never occur. Both are multiples of 64 for efficient matmuls.
# "small" thus has GPT-2 small's twelve blocks (85M parameters) but 89M parameters in all, not
# 124M: the difference is GPT-2's 50,257-token embedding, a small share of the cost per token.
SHAPES: dict[str, _Shape] = {
    "tiny": _Shape(vocab_size=2048, n_layer=2, n_embd=64, n_head=2),
    "small": _Shape(vocab_size=4096, n_layer=12, n_embd=768, n_head=12),
}
N_POSITIONS = 1024


def build_model(
    directory: Path, *, size: ModelSize, seed: int = 0, context_tokens: int = N_POSITIONS
) -> Path:
    """Write a tokenizer and randomly initialised GPT-2 of the given size into ``directory``,
    with a context window of ``context_tokens``."""
    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(shape.vocab_size, context_tokens)
    model = _build_weights(shape, tokenizer, seed=seed, context_tokens=context_tokens)
    with quiet_progress_bars():
        tokenizer.save_pretrained(directory)
        model.save_pretrained(directory)  # safetensors: the only format transformers 5 writes
    for weights in directory.glob("*.safetensors"):
        # safetensors creates the file owner-only (0600); a worker running as another user, or
        # in a container over a mounted volume, must be able to read it like the JSON beside it.
        weights.chmod(0o644)
    return directory


def _build_tokenizer(vocab_size: int, context_tokens: int = N_POSITIONS) -> Any:
    # BPE training is deterministic (merges ordered by count, then by pair), so the tokenizer
    # needs no seed: the same corpus always yields the same vocabulary and merges.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([CORPUS_PATH.read_text(encoding="utf-8")], trainer=trainer)
    if raw.get_vocab_size() != vocab_size:
        # A shorter corpus would silently change the model's shape; refuse instead.
        raise RuntimeError(
            f"corpus supports only {raw.get_vocab_size()} tokens, {vocab_size} requested"
        )
    tokenizer_class: Any = PreTrainedTokenizerFast  # its __init__ is unannotated
    return tokenizer_class(
        tokenizer_object=raw,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TURN,
        pad_token=END_OF_TEXT,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=context_tokens,
        # Decoder-only models are batched with left padding so every row ends at its last token.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _build_weights(shape: _Shape, tokenizer: Any, *, seed: int, context_tokens: int) -> Any:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=context_tokens,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng leaves the caller's global RNG as it was; initialisation happens on the CPU so
    # the same seed gives the same bytes whatever accelerator the machine has.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.inference.model_init",
        description="Build a random GPT-2 chat model with a locally trained tokenizer.",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_model(args.directory, size=args.size, seed=args.seed))


if __name__ == "__main__":
    main()
