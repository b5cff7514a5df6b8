"""Shared fixtures: tiny random models of every supported family, and the embedded SmolLM2 model."""

from __future__ import annotations

import os
from pathlib import Path

# Without a GPU, Triton kernels run in its interpreter. This must be set before anything imports `triton.language`
# (transformers does), or Triton's own @jit helpers (tl.zeros, ...) are built for compilation and fail inside
# interpreted kernels.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from leank_hf.embedded import embedded_model_path, load_model, load_tokenizer

_COMMON = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, head_dim=32)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON, use_sliding_window=False)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, head_dim=32, sliding_window=None)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=32, use_sliding_window=False)),
    # Gemma3: two sliding layers with a window shorter than the test sequences, and a full-attention layer.
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_COMMON,
            head_dim=32,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
        )
    ),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**_COMMON, sliding_window=None)),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny randomly initialised model of `family` in eval mode (SDPA attention, downloads nothing)."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()


def _smollm2_path() -> tuple[str, str]:
    """Folder and GGUF file of the embedded SmolLM2 (`LEANK_SMOLLM2_DIR` where set); skips where it is missing."""
    try:
        return embedded_model_path()
    except OSError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer alone (~4 s): real chat template and vocabulary for data tests. Older
    transformers read no padding token from the GGUF; padding collators need one."""
    return load_tokenizer(*_smollm2_path())


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    """A tiny random Llama over a real tokenizer's vocabulary (head_dim 32, 2 KV heads of 2 query heads each)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "vocab_size": vocab_size, "num_hidden_layers": layers,
                            "max_position_embeddings": 4096}, head_dim=32)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (loaded once per session, ~20 s)."""
    return load_model(*_smollm2_path(), device="cpu")


@pytest.fixture
def decoder_calls(monkeypatch) -> list:
    """One entry per call of the Triton decode kernel's `LeanKDecoder` (a test of a path that should reach the kernel
    counts them: on the CPU, a dispatch slip silently runs the reference instead)."""
    pytest.importorskip("triton")
    from leank_hf.kernels import decode

    calls = []
    call = decode.LeanKDecoder.__call__
    monkeypatch.setattr(decode.LeanKDecoder, "__call__", lambda *a, **k: calls.append(1) or call(*a, **k))
    return calls
