"""CUDA-only checks: the decode path at Llama-3.1-8B shapes with the paper's mask, and a model split across devices."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from leank_hf import LeanKCache
from leank_hf.cache.layer import LeanKLayer
from leank_hf.compat import cache_kwargs

from .conftest import tiny_model
from .helpers import (
    REFERENCE_MASKS,
    assert_pruned_path_ran,
    drive_layer,
    generate_both,
    keep_all,
    left_padded_batch,
    pruned,
    random_mask,
)
from .tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LLAMA_MASK = REFERENCE_MASKS / "llama-3.1-8b-instruct.safetensors"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_index", [0, 17])
def test_decode_at_llama8b_shape_matches_dense_definition(dtype, layer_index, decoder_calls):
    """32 q heads, 8 KV heads, head_dim 128, sink 64 / recent 256, 2K-token prompts with padding, one flush; every
    one-token step through the Triton kernel."""
    generator = torch.Generator().manual_seed(layer_index)
    if LLAMA_MASK.is_file():
        mask = load_file(LLAMA_MASK)["channel_mask"][layer_index].bool()
    else:
        mask = random_mask(8, 128, 32, generator)
    layer = LeanKLayer(mask, sink=64, recent=256, block_size=64)
    steps = [2048] + [1] * 70
    for index, output, expected, query_valid in drive_layer(layer, steps, [0, 300], 32, 128, dtype, generator, "cuda"):
        if index == 0 or index % 10 == 0 or index == len(steps) - 1:
            rows = query_valid[:, None, :].expand(-1, 32, -1)
            assert_close(output[rows], expected[rows], dtype)
    assert layer.view().middle_keys.device.type == "cuda"
    assert len(decoder_calls) == len(steps) - 1


def test_layers_split_across_cuda_and_cpu():
    """Layers executing on different devices (what device_map does across GPUs): each keeps its cache and masks."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama").to("cuda")
    devices = ["cuda", "cpu", "cuda"]
    for layer, device in zip(model.model.layers, devices, strict=True):
        layer.to(device)
        add_hook_to_module(layer, AlignDevicesHook(execution_device=device, io_same_device=True))
    inputs = {k: v.cuda() for k, v in left_padded_batch([40, 23], model.config.vocab_size).items()}
    dense, leank, cache = generate_both(model, keep_all(model), inputs)
    assert torch.equal(dense.cpu(), leank.cpu())
    pruned_cache = LeanKCache(pruned(model), model)
    model.generate(**inputs, **cache_kwargs(pruned_cache), max_new_tokens=8, pad_token_id=0)
    assert_pruned_path_ran(pruned_cache)
    for layers in (cache.layers, pruned_cache.layers):
        for layer, device in zip(layers, devices, strict=True):
            assert layer.view().middle_keys.device.type == device
            assert layer.layout.packed_index.device.type == device, "masks live on their layer's device"


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_bf16_generate_on_cuda_runs_the_pruned_path(family):
    model = tiny_model(family, torch.bfloat16).to("cuda")
    inputs = {k: v.cuda() for k, v in left_padded_batch([60, 41], model.config.vocab_size).items()}
    cache = LeanKCache(pruned(model), model)
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=16, do_sample=False, pad_token_id=0)
    dense = model.generate(**inputs, **cache_kwargs(DynamicCache(config=model.config)), max_new_tokens=1,
                           do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(out[:, : dense.shape[1]], dense)
    assert_pruned_path_ran(cache)
