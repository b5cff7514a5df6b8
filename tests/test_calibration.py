"""calibrated_masks: scores equal mean |q_c| · mean |k_c| of post-RoPE q/k computed independently from the weights."""

from __future__ import annotations

import pytest
import torch

from leank_hf import LeanKCache, calibrated_masks, select_channels
from leank_hf.cache.attention import observing
from leank_hf.methods.calibration import ChannelStats

from .conftest import tiny_model
from .helpers import independent_scores, left_padded_batch


def test_scores_match_independent_computation_with_padding():
    model = tiny_model("llama")
    inputs = left_padded_batch([40, 25, 31], model.config.vocab_size)
    from leank_hf import ModelSpec

    spec = ModelSpec.from_config(model.config)
    with torch.no_grad(), observing(model, ChannelStats(spec)) as stats:
        model(**inputs)
    assert model.config._attn_implementation == "sdpa", "the model's attention implementation is restored"
    expected = independent_scores(model, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(stats.scores().float(), expected, rtol=1e-4, atol=1e-6)


def test_calibrated_masks_select_by_those_scores():
    model = tiny_model("llama")
    inputs = left_padded_batch([40, 25], model.config.vocab_size)
    masks = calibrated_masks(model, inputs["input_ids"], keep_ratio=0.5, align=16,
                                        attention_mask=inputs["attention_mask"], batch_size=2, sink=8)  # fmt: skip
    expected = select_channels(independent_scores(model, inputs["input_ids"], inputs["attention_mask"]), 0.5, 16)
    assert torch.equal(masks.to_dense(), expected)
    assert masks.sink == 8 and masks.method["name"] == "calibration" and masks.keep_ratio == 0.5
    LeanKCache(masks, model)  # usable as is


def test_keep_ratio_one_keeps_everything_and_text_needs_a_tokenizer():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 90, (1, 20))
    assert calibrated_masks(model, ids, keep_ratio=1.0).to_dense().all()
    with pytest.raises(ValueError, match="tokenizer"):
        calibrated_masks(model, ["some text"])
    with pytest.raises(ValueError, match="LongTensor"):
        calibrated_masks(model, torch.rand(1, 20))


def test_gemma3_sliding_layers_are_not_pruned():
    model = tiny_model("gemma3")
    masks = calibrated_masks(model, torch.randint(3, 90, (1, 30)), keep_ratio=0.25)
    dense = masks.to_dense()
    assert dense[0].all() and dense[2].all() and not dense[1].all()


def test_channel_stats_ignore_layers_outside_the_spec():
    model = tiny_model("gemma3")
    from leank_hf import ModelSpec

    stats = ChannelStats(ModelSpec.from_config(model.config))
    stats.add(0, torch.ones(1, 4, 3, 32), torch.ones(1, 2, 3, 32), None)
    assert stats.tokens[0] == 0


def test_a_model_loaded_from_a_folder_records_no_path_as_its_base_model(tmp_path):
    """A local folder is not a Hub id: the masks say nothing rather than a path a card would link to."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config._name_or_path == str(tmp_path)
    masks = calibrated_masks(model, torch.randint(3, 90, (1, 30)), keep_ratio=0.5)
    assert masks.base_model is None
    assert calibrated_masks(model, torch.randint(3, 90, (1, 30)), base_model="org/model").base_model == ("org/model")
