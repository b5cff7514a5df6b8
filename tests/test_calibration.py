"""from_calibration: scores equal mean |q_c| · mean |k_c| of post-RoPE q/k computed independently from the weights."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leank_hf import LeanKCache, LeanKMasks, select_channels
from leank_hf.attention import observing
from leank_hf.calibration import ChannelStats

from .conftest import tiny_model
from .test_cache_generate import left_padded_batch


def independent_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Post-RoPE |q| (group-averaged) and |k| means over real tokens, recomputed from each layer's projections."""
    captured = {}

    def capture(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    config = model.config
    scores = []
    real = attention_mask.bool()
    for index, layer in enumerate(model.model.layers):
        hidden, (cos, sin) = captured[index]
        attn = layer.self_attn
        batch, tokens, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = config.num_attention_heads // config.num_key_value_heads
        abs_q = q.abs().reshape(batch, config.num_key_value_heads, group, tokens, -1).mean(2)
        mean_q = abs_q.permute(0, 2, 1, 3)[real].mean(0)  # [H, D]
        mean_k = k.abs().permute(0, 2, 1, 3)[real].mean(0)
        scores.append(mean_q * mean_k)
    return torch.stack(scores)


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


def test_from_calibration_selects_by_those_scores():
    model = tiny_model("llama")
    inputs = left_padded_batch([40, 25], model.config.vocab_size)
    masks = LeanKMasks.from_calibration(model, inputs["input_ids"], keep_ratio=0.5, align=16,
                                        attention_mask=inputs["attention_mask"], batch_size=2, sink=8)  # fmt: skip
    expected = select_channels(independent_scores(model, inputs["input_ids"], inputs["attention_mask"]), 0.5, 16)
    assert torch.equal(masks.to_dense(), expected)
    assert masks.sink == 8 and masks.method["name"] == "calibration" and masks.keep_ratio == 0.5
    LeanKCache(masks, model)  # usable as is


def test_keep_ratio_one_keeps_everything_and_text_needs_a_tokenizer():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 90, (1, 20))
    assert LeanKMasks.from_calibration(model, ids, keep_ratio=1.0).to_dense().all()
    with pytest.raises(ValueError, match="tokenizer"):
        LeanKMasks.from_calibration(model, ["some text"])
    with pytest.raises(ValueError, match="LongTensor"):
        LeanKMasks.from_calibration(model, torch.rand(1, 20))


def test_gemma3_sliding_layers_are_not_pruned():
    model = tiny_model("gemma3")
    masks = LeanKMasks.from_calibration(model, torch.randint(3, 90, (1, 30)), keep_ratio=0.25)
    dense = masks.to_dense()
    assert dense[0].all() and dense[2].all() and not dense[1].all()


def test_channel_stats_ignore_layers_outside_the_spec():
    model = tiny_model("gemma3")
    from leank_hf import ModelSpec

    stats = ChannelStats(ModelSpec.from_config(model.config))
    stats.add(0, torch.ones(1, 4, 3, 32), torch.ones(1, 2, 3, 32), None)
    assert stats.tokens[0] == 0
