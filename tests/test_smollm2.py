"""The embedded SmolLM2-135M-Instruct (real weights): drop-in equivalence and the demo. Slow: ~1-2 min on 2 cores."""

from __future__ import annotations

import copy
import functools
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import DynamicCache

from leank_hf import LeanKCache, LeanKMasks, calibrated_masks
from leank_hf.cache.layer import LeanKLayer
from leank_hf.compat import cache_kwargs

from .tolerances import assert_close

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long_context_qa.py"


@functools.cache
def example() -> ModuleType:
    """The README demo's module (`examples/long_context_qa.py`): its logbook prose and question prompts (imported
    once: the path goes onto `sys.path` once)."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import long_context_qa

    return long_context_qa


def prose_ids(tokenizer, tokens: int, seed: int) -> torch.Tensor:
    text = example().logbook(random.Random(seed), tokens // 26)
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]


def test_keep_all_masks_reproduce_dynamic_cache(smollm2):
    """Default windows (sink 64, recent 256, block 64) over a 700-token prompt: several flushes, same tokens."""
    model, tokenizer = smollm2
    ids = prose_ids(tokenizer, 700, seed=0)
    masks = LeanKMasks(torch.ones(30, 3, 64, dtype=torch.bool))
    common = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 70, "do_sample": False}
    dense = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **common)
    cache = LeanKCache(masks, model)
    leank = model.generate(ids, **cache_kwargs(cache), **common)
    assert torch.equal(dense, leank)
    assert all(layer.view().middle_len > 0 for layer in cache.layers if isinstance(layer, LeanKLayer))


def test_calibrated_masks_save_memory_and_keep_the_first_token(smollm2, tmp_path):
    model, tokenizer = smollm2
    masks = calibrated_masks(model, prose_ids(tokenizer, 1024, seed=1), keep_ratio=0.3, align=16)
    assert masks.keep_ratio == pytest.approx(0.3, abs=0.01)
    masks.save_pretrained(tmp_path)
    ids = prose_ids(tokenizer, 1500, seed=2)
    common = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False}
    dense = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **common)
    cache = LeanKCache.from_pretrained(tmp_path, model)
    leank = model.generate(ids, **cache_kwargs(cache), **common)
    assert torch.equal(dense[:, : ids.shape[1] + 1], leank[:, : ids.shape[1] + 1])
    report = cache.memory_report()
    assert report.key_bytes < 0.5 * report.dense_bytes / 2, "the middle K cache must shrink by more than half"
    assert report.saved_fraction > 0.2


def test_readme_demo_runs(smollm2):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tokens", "1200", "--calibration-tokens", "1024", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert "| LeanKCache |" in result.stdout and "saved" in result.stdout


def test_calibration_from_text_with_a_tokenizer(smollm2):
    model, tokenizer = smollm2
    texts = [example().logbook(random.Random(seed), 12) for seed in range(3)]
    masks = calibrated_masks(model, texts, tokenizer=tokenizer, keep_ratio=0.5, batch_size=2)
    assert masks.keep_ratio == pytest.approx(0.5, abs=0.01)
    assert masks.method["tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in texts)


def test_shipped_learned_masks_beat_calibration_on_heldout_text(smollm2):
    """The shipped masks keep what they were shipped for: on held-out prose they agree with the full cache better
    than calibrated masks at the same ratio (a short version of BENCHMARKS.md section 4)."""
    from leank_hf.eval import standard_methods
    from leank_hf.eval.metrics import decoded_logits, heldout_windows, next_token_agreement

    model, tokenizer = smollm2
    learned = LeanKMasks.from_pretrained("smollm2-135m-instruct")
    assert learned.method["name"] == "learned" and learned.keep_ratio == pytest.approx(0.3)
    window = heldout_windows(tokenizer, 2048, 1)[0]
    reference = decoded_logits(model, window, DynamicCache(config=model.config), 64)
    calibrated = standard_methods(model, tokenizer, baselines=["calibration"], calibration_tokens=2048)["calibration"]
    kl = {
        name: next_token_agreement(reference, decoded_logits(model, window, LeanKCache(masks, model), 64))[0]
        for name, masks in (("learned", learned), ("calibration", calibrated(0.3, None)))
    }
    assert kl["learned"] < 0.75 * kl["calibration"], kl


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_decoding_of_the_real_model_on_the_gpu(smollm2):
    """What users run for speed: `generate` compiles LeanK's decode steps (max_cache_len) in bf16 with the shipped
    learned masks. The buried fact is found, and the logits follow eager decoding of the same cache within bf16
    tolerance up to the first token where the two pick differently (compiled kernels round differently, as the stock
    StaticCache's do: on an H100 either can flip a near-tie late in an answer)."""
    model, tokenizer = smollm2
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    ids, code = example().build_prompt(tokenizer, 2500, seed=0)
    ids = ids.cuda()
    masks = LeanKMasks.from_pretrained("smollm2-135m-instruct")

    def generate(**kwargs):
        cache = LeanKCache(masks, model, max_cache_len=ids.shape[1] + 16)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=16,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
        return out.sequences[0, ids.shape[1] :], torch.stack(out.logits).float()

    eager_tokens, eager_logits = generate(disable_compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tokens, logits = generate()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "generate did not compile"
    assert code in tokenizer.decode(tokens, skip_special_tokens=True)
    differing = (tokens != eager_tokens).nonzero()
    same_inputs = int(differing[0]) + 1 if len(differing) else len(tokens)
    assert_close(logits[:same_inputs], eager_logits[:same_inputs], torch.bfloat16)
