"""The locally built model: deterministic, loadable by the Auto classes, and chat-ready."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.inference.loader import load_model
from worker.inference.model_init import SHAPES, _build_tokenizer, build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_folder_across_processes(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # A second build in a fresh interpreter (through the CLI) rules out in-process caching and
    # hash-seed effects; the CLI prints the folder and nothing else.
    again = tmp_path / "again"
    completed = subprocess.run(
        [sys.executable, "-m", "worker.inference.model_init", str(again), "--size", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout == f"{again}\n"
    assert completed.stderr == ""
    original = _files(tiny_dir)
    assert "model.safetensors" in original
    assert "tokenizer.json" in original
    assert _files(again) == original


def test_other_seed_changes_weights_not_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    other = _files(build_model(tmp_path, size="tiny", seed=1))
    original = _files(tiny_dir)
    assert other["model.safetensors"] != original["model.safetensors"]
    assert other["tokenizer.json"] == original["tokenizer.json"]


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_model(tmp_path, size="tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_folder_loads_with_auto_classes(tiny_dir: Path) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert tokenizer.is_fast
    assert len(tokenizer) == model.config.vocab_size == SHAPES["tiny"].vocab_size
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 64, 2)
    assert model.config.n_positions == 1024
    assert tokenizer.eos_token == "<|end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token is not None
    for token in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        # Each marker must be one id, never split into bytes, or the template would not work.
        assert tokenizer.encode(token, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(token)
        ]


def test_chat_template_uses_role_tokens_and_generation_prompt(tiny_dir: Path) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    )
    cued = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert cued == rendered + "<|assistant|>\n"


def test_corpus_supports_the_small_vocabulary() -> None:
    # Building "small" writes ~350 MB, too much for a unit test; its tokenizer is the part
    # that can fail (a corpus too short for the vocabulary), so that is what is checked.
    assert len(_build_tokenizer(SHAPES["small"].vocab_size)) == SHAPES["small"].vocab_size
    small = SHAPES["small"]
    assert (small.n_layer, small.n_embd, small.n_head) == (12, 768, 12)


def test_unknown_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model size"):
        build_model(tmp_path, size="huge", seed=0)  # type: ignore[arg-type]


def test_load_model_on_cpu(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), device="cpu")
    assert loaded.device == "cpu"
    assert loaded.max_context_tokens == 1024
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token_id is not None


def test_load_model_uses_eos_when_tokenizer_has_no_pad(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|end|>"
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.eos_token_id
