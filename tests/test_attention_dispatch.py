"""LeanK borrows the model: other caches run the model's own implementation after a LeanK cache, calibration and
mask learning hand the model back as they found it, and calibrating a model does not disturb a generation running
on it in another thread."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from leank_hf import LeanKCache, calibrated_masks
from leank_hf.compat import cache_kwargs
from leank_hf.training import prepare_for_mask_learning

from .conftest import _COMMON, tiny_model
from .helpers import answer_batch, assert_pruned_path_ran, generate_both, keep_all, left_padded_batch, pruned


def dynamic_logits(model, inputs) -> torch.Tensor:
    out = model.generate(
        **inputs, **cache_kwargs(DynamicCache(config=model.config)), max_new_tokens=8, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return torch.stack(out.logits)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_other_caches_run_the_models_own_implementation_after_leank(implementation):
    model = tiny_model("llama")
    model.set_attn_implementation(implementation)
    inputs = left_padded_batch([20, 13], model.config.vocab_size)
    before = dynamic_logits(model, inputs)
    model.generate(**inputs, **cache_kwargs(LeanKCache(pruned(model), model)), max_new_tokens=8, pad_token_id=0)
    assert torch.equal(dynamic_logits(model, inputs), before)


def test_an_eager_models_leank_prefill_is_its_own_eager_attention():
    """The prompt is attended by the model's own implementation: the first token's logits are the same bits."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    inputs = left_padded_batch([20, 13], model.config.vocab_size)
    before = dynamic_logits(model, inputs)
    out = model.generate(
        **inputs, **cache_kwargs(LeanKCache(pruned(model), model)), max_new_tokens=8, do_sample=False,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.logits[0], before[0])


def test_calibration_leaves_the_implementation_as_it_found_it():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    calibrated_masks(model, torch.randint(3, 90, (1, 30)), keep_ratio=0.5)
    assert model.config._attn_implementation == "eager"


def test_mask_learning_hands_the_model_back_between_forwards():
    """A training step runs the student's attention; afterwards the eager model generates with a DynamicCache exactly
    as before, bit for bit."""
    model = tiny_model("llama").requires_grad_(False)  # as mask learning leaves it (frozen weights round differently)
    model.set_attn_implementation("eager")
    inputs = left_padded_batch([20, 13], model.config.vocab_size)
    before = dynamic_logits(model, inputs)
    learner = prepare_for_mask_learning(model, sink=4, recent=8)
    learner(**answer_batch(model.config.vocab_size, [30, 19], answer=5, pad_left=True)).loss.backward()
    assert learner.channel_scales.grad.abs().sum() > 0, "the student's attention did not run"
    assert model.config._attn_implementation == "eager"
    assert torch.equal(dynamic_logits(model, inputs), before)


def test_calibration_and_generation_on_one_model_in_two_threads():
    model = tiny_model("llama")
    masks = pruned(model)
    inputs = left_padded_batch([30, 22], model.config.vocab_size)
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**inputs, **cache_kwargs(LeanKCache(masks, model)), **greedy)
    errors, outputs, calibrating = [], [], threading.Event()

    def calibrate_repeatedly():
        calibrating.set()
        try:
            for seed in range(6):
                ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(seed))
                calibrated_masks(model, ids, keep_ratio=0.5)
        except Exception as err:  # reported below: a thread's exception would otherwise vanish
            errors.append(err)

    thread = threading.Thread(target=calibrate_repeatedly)
    thread.start()
    calibrating.wait()
    try:
        while thread.is_alive():
            outputs.append(model.generate(**inputs, **cache_kwargs(LeanKCache(masks, model)), **greedy))
    finally:
        thread.join()
    assert not errors, errors
    assert outputs and all(torch.equal(out, expected) for out in outputs)


def test_a_model_with_only_sliding_layers_is_said_to_prune_nothing():
    model = MistralForCausalLM(MistralConfig(**_COMMON, head_dim=32, sliding_window=16)).eval()
    nothing_pruned = r"no full-attention layer to prune .*sliding_window=16.*calibrated masks prune nothing"
    with pytest.warns(UserWarning, match=nothing_pruned):
        masks = calibrated_masks(model, torch.randint(3, 90, (1, 30)), keep_ratio=0.3)
    assert masks.to_dense().all()
    with pytest.warns(UserWarning, match="a LeanKCache would prune nothing"):
        LeanKCache(keep_all(model), model)


def test_an_eager_model_decodes_left_padded_rows_as_with_a_dynamic_cache():
    """Eager attention hands LeanK an additive float mask: its padding must be read as padding, as SDPA's boolean one
    is (padding longer than the sink in row 2), or the LeanK decode steps attend to pad tokens."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    inputs = left_padded_batch([40, 23, 9], model.config.vocab_size)
    dense, leank, cache = generate_both(model, keep_all(model), inputs)
    assert torch.equal(dense, leank)
    assert_pruned_path_ran(cache)
