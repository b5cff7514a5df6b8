"""Launching the Triton decode kernels of `decode_kernels.py`: which steps they take (`supports`), the input checks, the
split plan and the merge's tiles, and `LeanKDecoder`, which keeps one layer's launch set-up from step to step.

The middle's split count fills whole waves of the programs the GPU holds at once (`_middle_splits`). The fast path
launches the kernels Triton compiled without going through its JIT each step; what that reads of Triton's internals
is all in `triton_gate.py`, which falls back to the JIT launch where a Triton version lacks it.

A quantized middle (`QuantizedPrunedKV`) takes the same kernel, compiled with its bit width, key block and value
group as constants: the middle programs dequantize in registers (`decode_kernels._middle_tiles`).

`benchmarks/decode_attention.py` times it against SDPA; `benchmarks/tune_decode.py` sweeps `DecodeTuning`;
`tests/test_triton_decode.py` checks it against the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, NamedTuple

import torch

from .decode_kernels import _leank_decode_kernel, _merge_kernel
from .layout import ChannelLayout, NewTokens, PrunedKV, QuantizedPrunedKV
from .triton_gate import current_stream, fast_kernel, launch, resident_programs

if TYPE_CHECKING:
    from triton.compiler import CompiledKernel

_LOG2E = 1.4426950408889634


class DecodeTuning(NamedTuple):
    """Launch parameters of the decode kernel (`benchmarks/tune_decode.py` sweeps them).

    Attributes:
        block_n: tokens per tile of the inner loop.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the token loop.
        min_split_tokens: fewest middle tokens per split.
        full_split_tokens: full-width (sink + window) tokens per program.
        max_waves: most waves of middle programs to consider. The split count is the one that best fills whole waves
            (all the programs the GPU holds at once), fewest waves first; see `_middle_splits`.

    The defaults were the fastest or within about 2 % of it at every shape `benchmarks/tune_decode.py` swept on an
    H100 (batch 1-32, 8K-128K tokens, Llama-3.1-8B geometry and masks; BENCHMARKS.md), so no autotuning runs.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    min_split_tokens: int = 256
    full_split_tokens: int = 128
    max_waves: int = 4


_MERGE_CHANNELS = {16: 64, 32: 32, 64: 32, 128: 16}  # channels per merge program, by its split tile


def _merge_tile(num_splits: int, head_dim: int) -> tuple[int, int]:
    """(splits, channels) one merge program reduces per step. Splits: the split count rounded up to a power of two
    in [16, 128] (a few buckets, so lengths never recompile it; up to 128 splits are read in one step, faster than two
    steps of 64); fewer splits leave room for more channels. Both beat one 64 x head_dim tile at every batch measured
    (BENCHMARKS.md, section 1)."""
    block_s = min(128, max(16, 1 << (num_splits - 1).bit_length()))
    return block_s, min(head_dim, _MERGE_CHANNELS[block_s])


def supports(query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV) -> bool:
    """Whether the Triton kernel handles this step: one bf16/fp16 query token per row with contiguous channels,
    power-of-two head_dim >= 16, kept counts in multiples of at least 16 channels (the smallest `tl.dot` operand), and
    each row's real middle tokens contiguous (`cache.middle_start` given). A quantized middle needs 8 or 4 bits, a key
    block of any length >= 1 and a value group that divides head_dim (`QuantizedPrunedKV.quantize` makes no other);
    `_check` says what its tensors need."""
    stored, quantized = _parts(cache)
    head_dim = query.shape[-1]
    return (
        query.shape[2] == 1
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.stride(-1) == 1
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and stored.layout.chunk >= 16
        and stored.middle_start is not None
        and (
            quantized is None
            or (
                quantized.bits in (4, 8)
                and quantized.block_size >= 1
                and quantized.group_size >= 1
                and head_dim % quantized.group_size == 0
            )
        )
    )


def takes_new_tokens(new: NewTokens, cache: PrunedKV | QuantizedPrunedKV) -> bool:
    """Whether the kernel can write this step's tokens itself: contiguous channels, in the window's dtype."""
    window = _parts(cache)[0].recent_keys
    return (
        new.keys.stride(-1) == 1 and new.values.stride(-1) == 1 and new.keys.dtype == new.values.dtype == window.dtype
    )


def _parts(cache: PrunedKV | QuantizedPrunedKV) -> tuple[PrunedKV, QuantizedPrunedKV | None]:
    """(the `PrunedKV` whose tensors the kernel reads, the quantized cache around it or None for a float middle)."""
    if isinstance(cache, QuantizedPrunedKV):
        return cache.cache, cache
    return cache, None


def _cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (`triton.cdiv` costs a few microseconds per call here, on every layer's step)."""
    return -(-a // b)


_SLOTS: dict[tuple, int] = {}


def _slots(device: torch.device, constexprs: dict, options: dict, warm_up: Callable[[], object]) -> int:
    """Programs the GPU holds at once: resident programs per multiprocessor (`resident_programs`) times
    multiprocessors. `warm_up` compiles the kernel for these constants, once per set of them (so once per layer width:
    lengths are not among them)."""
    key = (device, *constexprs.values(), *options.values())
    if key not in _SLOTS:
        kernel = fast_kernel(warm_up()) if device.type == "cuda" else None
        _SLOTS[key] = resident_programs(kernel, device) * _multiprocessors(device)
    return _SLOTS[key]


@functools.cache
def _dependent_launch(device: torch.device) -> bool:
    """Whether the merge launches as a programmatic dependent of the split kernel (Hopper and later): it then starts
    while the split kernel's last programs run instead of after it."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _middle_splits(tuning: DecodeTuning, middle_rows: int, middle_len: int, slots: int) -> tuple[int, int]:
    """(tokens per split, splits) of the middle tokens of `middle_rows` (row, head that keeps channels) pairs.

    The GPU holds `slots` programs at once. A grid that ends with a partly filled wave leaves most multiprocessors
    waiting on the few programs left: on an H100, 4 programs per multiprocessor where 3 fit was 14-18 % slower than
    exactly 3. So the split count is the one whose programs best fill whole waves, and the fewest waves among those
    within 2 % of the best fill (fewer, longer programs start and merge less).
    """
    if middle_rows == 0 or middle_len == 0:
        return tuning.block_n, 0
    most = max(1, middle_len // tuning.min_split_tokens)
    splits, best_fill = 1, 0.0
    for waves in range(1, tuning.max_waves + 1):
        candidate = max(1, min(most, waves * slots // middle_rows))
        programs = middle_rows * candidate
        fill = programs / (_cdiv(programs, slots) * slots)
        if fill > best_fill + 0.02:
            splits, best_fill = candidate, fill
    # Whole multiples of 16 tokens (not of `block_n`, which could drop a split and leave a wave partly empty).
    split_tokens = _cdiv(_cdiv(middle_len, splits), 16) * 16
    return split_tokens, _cdiv(middle_len, split_tokens)


def leank_decode_triton(
    query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, scaling: float, tuning: DecodeTuning | None = None,
    new: NewTokens | None = None,
) -> torch.Tensor:  # fmt: skip
    """Same as `leank_attention_reference` for one query token per row (`Q == 1`): a split launch and a merge launch.

    Args:
        query: `[B, Hq, 1, D]`, bf16/fp16; D a power of two (64, 128). Other steps: see `supports`.
        cache: the stored tokens; the window ends with this step's token (see `PrunedKV`); its middle quantized or
            not (`QuantizedPrunedKV`).
        scaling: multiplier of q·k.
        tuning: launch parameters; `DecodeTuning()` when None.
        new: this step's token, when the window's last slot is not written yet: the kernel writes it there (keys,
            values and flag) as it attends (see `NewTokens`).

    Returns:
        `[B, Hq, 1, D]` in the query dtype (fp32 accumulation).

    Each call sets the launch up from scratch; a layer decoding step after step keeps a `LeanKDecoder` instead.
    """
    return LeanKDecoder(tuning)(query, cache, scaling, new)


class LeanKDecoder:
    """`leank_decode_triton` for one layer, step after step, with its host-side set-up paid once instead of per step.

    Eager decoding launches every kernel of every layer from the host in turn, so host time per layer adds to the
    time per token. Set up from scratch, a decode call costs several times SDPA's host time (BENCHMARKS.md, section
    2a): about half in Triton binding and specialising the kernels' arguments, the rest in strides, the split plan
    and checks. A decoder keeps the launch constants, the split plan (it changes only when the middle
    grows, every `block_size` steps) and the compiled kernels. Each call reads what Triton specialises a compiled
    kernel on (dtypes, strides, pointer alignment, the layout) and, while that matches the last call's, launches the
    compiled kernels directly, without Triton's per-call binding, specialisation and cache lookup (where
    `triton_gate.fast_kernel` lets it); otherwise it checks the inputs again and launches through Triton's JIT. A
    caller that knows when its stores change passes a `cache_version`, and the cache's tensors are read again only
    when it changes.

    Args:
        tuning: launch parameters; `DecodeTuning()` when None.
    """

    def __init__(self, tuning: DecodeTuning | None = None) -> None:
        self.tuning = tuning or DecodeTuning()
        self._signature: tuple | None = None
        self._cache_version: Hashable | None = None
        self._cache_signature: tuple = ()
        self._cache_strides: tuple = ()
        self._layout: ChannelLayout | None = None  # held, so that its id in `_cache_signature` cannot be reused
        self._constexprs: dict[str, int | bool] = {}
        self._options: dict[str, int | bool] = {}
        self._slots = 1
        self._split_plan: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))  # (rows, len) -> plan
        self._split_kernel: CompiledKernel | None = None
        self._merge_kernels: dict[tuple[int, int], CompiledKernel | None] = {}

    def __call__(
        self, query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, scaling: float, new: NewTokens | None = None,
        cache_version: Hashable | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`leank_decode_triton(query, cache, scaling, self.tuning, new)`.

        `cache_version`: a value the caller changes whenever one of `cache`'s tensors may have been replaced
        (reallocated, reordered, re-strided); while it equals the last call's, the cache tensors' strides, dtypes and
        alignment are taken to be the last call's. None: read them every call.
        """
        stored = _parts(cache)[0]
        if stored.middle_start is None:
            _check(query, cache, new)  # raises; the signature below reads every tensor
        if cache_version is None or cache_version != self._cache_version:
            self._cache_strides, self._cache_signature = _cache_signature(cache)
            self._cache_version = cache_version
        new_valid = None if new is None or new.valid is None else new.valid.contiguous()
        step_tensors = (query,) if new is None else (query, new.keys, new.values)
        device = torch.cuda.current_device() if query.is_cuda else -1  # where Triton launches, as its JIT does
        signature = (
            self._cache_signature, query.shape, device, new is None, new_valid is None,
            tuple(tensor.stride() for tensor in step_tensors),
            tuple((tensor.dtype, tensor.data_ptr() % 16 == 0) for tensor in step_tensors),
            None if new_valid is None else (new_valid.dtype, new_valid.data_ptr() % 16 == 0),
        )  # fmt: skip
        if signature != self._signature:
            self._set_up(query, cache, new, new_valid)
            self._signature = signature

        batch, num_q_heads, _, head_dim = query.shape
        layout = stored.layout
        num_rows = layout.value_rows
        split_tokens, middle_splits = self._middle_splits(batch * num_rows, stored.middle_len)
        full_splits = _cdiv(stored.sink_keys.shape[2] + stored.recent_keys.shape[2], self.tuning.full_split_tokens)
        splits = middle_splits + full_splits
        out_part = torch.empty(batch, num_q_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(batch, num_q_heads, splits, dtype=torch.float32, device=query.device)
        grid = (batch * num_rows * middle_splits + batch * stored.recent_keys.shape[1] * full_splits,)
        args = _split_args(
            query, cache, self._cache_strides, new, new_valid, out_part, lse_part, scaling, split_tokens,
            middle_splits, self.tuning,
        )  # fmt: skip
        stream = current_stream(device) if self._split_kernel else None
        self._split_kernel = launch(
            _leank_decode_kernel, self._split_kernel, grid, args, self._constexprs, self._options, stream
        )

        out = torch.empty(batch, num_q_heads, 1, head_dim, dtype=query.dtype, device=query.device)
        tile = _merge_tile(splits, head_dim)
        merge_args = (
            out_part, lse_part, out, layout.offsets_table, *_partial_strides(out_part), out.stride(0), out.stride(1),
            splits, middle_splits,
        )  # fmt: skip
        merge_constexprs = {
            "NUM_Q_HEADS": num_q_heads, "GROUP": self._constexprs["GROUP"], "BLOCK_S": tile[0], "BLOCK_D": tile[1],
            "WAIT_FOR_SPLITS": self._constexprs["LET_MERGE_START"],
        }  # fmt: skip
        merge_options = {"num_warps": 2, "launch_pdl": self._constexprs["LET_MERGE_START"]}
        self._merge_kernels[tile] = launch(
            _merge_kernel, self._merge_kernels.get(tile), (batch * num_q_heads, head_dim // tile[1]), merge_args,
            merge_constexprs, merge_options, stream,
        )  # fmt: skip
        return out

    def _set_up(
        self, query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, new: NewTokens | None,
        new_valid: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """Check the inputs and derive the launch constants; forget the compiled kernels (they may not fit)."""
        _check(query, cache, new)
        stored, quantized = _parts(cache)
        num_q_heads, head_dim = query.shape[1], query.shape[3]
        num_heads = stored.recent_keys.shape[1]
        dependent_launch = _dependent_launch(query.device)
        self._layout = stored.layout
        # A float middle is BITS 16; its key block and value group are unused (1: one compiled float kernel).
        bits, key_block, value_group = (16, 1, 1) if quantized is None else quantized[-3:]
        self._constexprs = {
            "NUM_KV_HEADS": num_heads, "GROUP": num_q_heads // num_heads,
            "GROUP_PAD": max(16, 1 << (num_q_heads // num_heads - 1).bit_length()), "D": head_dim,
            "CHUNK": stored.layout.chunk, "KMAX": stored.layout.max_kept, "BLOCK_N": self.tuning.block_n,
            "LET_MERGE_START": dependent_launch, "NEW_TOKEN": new is not None, "NEW_VALID": new_valid is not None,
            "MIDDLE_LENGTH_ON_DEVICE": stored.middle_length is not None, "BITS": bits, "KEY_BLOCK": key_block,
            "VALUE_GROUP": value_group,
        }  # fmt: skip
        self._options = {"num_warps": self.tuning.num_warps, "num_stages": self.tuning.num_stages}

        def warm_up() -> object:
            out_part = query.new_empty(query.shape, dtype=torch.float32)  # one split
            args = _split_args(
                query, cache, self._cache_strides, new, new_valid, out_part, out_part[..., 0], 1.0, 1, 1, self.tuning
            )
            return _leank_decode_kernel.warmup(*args, grid=(1,), **self._constexprs, **self._options)

        self._slots = _slots(query.device, self._constexprs, self._options, warm_up)
        self._split_plan = ((0, 0), (0, 0))
        self._split_kernel = None
        self._merge_kernels = {}

    def _middle_splits(self, middle_rows: int, middle_len: int) -> tuple[int, int]:
        """`_middle_splits` of the current lengths, recomputed only when they change."""
        if self._split_plan[0] != (middle_rows, middle_len):
            plan = _middle_splits(self.tuning, middle_rows, middle_len, self._slots)
            self._split_plan = ((middle_rows, middle_len), plan)
        return self._split_plan[1]


def _cache_signature(cache: PrunedKV | QuantizedPrunedKV) -> tuple[tuple, tuple]:
    """(strides of the cache tensors the kernel reads, what Triton specialises a compiled kernel on among them: the
    layout, strides, dtypes and 16-byte alignment of every pointer, and a quantized middle's constants). A quantized
    middle's scales and zeros (keys', then values') follow the `PrunedKV`'s tensors."""
    stored, quantized = _parts(cache)
    tensors = (
        stored.sink_keys, stored.sink_values, stored.sink_lengths, stored.middle_keys, stored.middle_values,
        stored.middle_start, stored.recent_keys, stored.recent_values, stored.recent_valid,
    )  # fmt: skip
    if quantized is not None:
        tensors += (quantized.key_scales, quantized.key_zeros, quantized.value_scales, quantized.value_zeros)
    strides = tuple(tensor.stride() for tensor in tensors)
    length = stored.middle_length
    return strides, (
        id(stored.layout),
        strides,
        tuple((tensor.dtype, tensor.data_ptr() % 16 == 0) for tensor in tensors),
        None if length is None else (length.dtype, length.data_ptr() % 16 == 0),
        None if quantized is None else quantized[-3:],  # bits, block_size, group_size
    )


def _check(query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, new: NewTokens | None = None) -> None:
    """Raise ValueError for inputs the kernel does not handle."""
    stored, quantized = _parts(cache)
    if not supports(query, cache) or (new is not None and not takes_new_tokens(new, cache)):
        new_tokens = "" if new is None else (
            f", new keys/values {new.keys.dtype}/{new.values.dtype} (channel strides {new.keys.stride(-1)}/"
            f"{new.values.stride(-1)}) for a {stored.recent_keys.dtype} window"
        )  # fmt: skip
        middle = "" if quantized is None else (
            f", a middle quantized to {quantized.bits} bits in key blocks of {quantized.block_size} tokens and value "
            f"groups of {quantized.group_size} channels"
        )  # fmt: skip
        raise ValueError(
            f"the LeanK decode kernel handles one bf16/fp16 query token per row (contiguous channels) with kept counts "
            f"in multiples of 16 and contiguous real middle tokens, a quantized middle in 8 or 4 bits with value "
            f"groups that divide head_dim; got query {tuple(query.shape)} {query.dtype} (channel stride "
            f"{query.stride(-1)}), channel tile {stored.layout.chunk}, middle_start "
            f"{'None' if stored.middle_start is None else 'given'}{new_tokens}{middle} (see `supports`)"
        )
    shared = (
        stored.sink_keys.stride() == stored.sink_values.stride()
        and stored.recent_keys.stride() == stored.recent_values.stride()
    )
    if not shared:
        raise ValueError("sink (and window) keys and values must share one layout")
    if quantized is not None:
        _check_quantized(quantized, query.shape[-1])
    elif stored.middle_keys.stride(3) != 1 or stored.middle_keys.stride(2) != stored.layout.chunk:
        raise ValueError("the middle-key store must be chunk-major with contiguous chunks (see ChannelLayout)")


def _check_quantized(cache: QuantizedPrunedKV, head_dim: int) -> None:
    """Raise ValueError for a quantized middle whose tensors the kernel cannot read: uint8 codes, key codes
    chunk-major with contiguous chunks, every code row and every row of scales contiguous, zeros laid out as their
    scales, and scales for every stored slot (key blocks up to the last slot's, covering the capacity when
    `middle_length` is given)."""
    stored, bits = cache.cache, cache.bits
    keys, values = stored.middle_keys, stored.middle_values
    batch, chunks, middle, chunk = *stored.middle_keys.shape[:3], stored.layout.chunk
    key_bytes, value_bytes = chunk * bits // 8, head_dim * bits // 8
    if keys.dtype != torch.uint8 or values.dtype != torch.uint8:
        raise ValueError(f"quantized middle codes must be uint8, got keys {keys.dtype} and values {values.dtype}")
    if keys.shape[3] != key_bytes or keys.stride(3) != 1 or keys.stride(2) != key_bytes:
        raise ValueError(
            f"the middle-key codes must be chunk-major with contiguous chunks of {key_bytes} bytes per token "
            f"({chunk} channels at {bits} bits); got shape {tuple(keys.shape)}, strides {keys.stride()}"
        )
    if values.shape[3] != value_bytes or values.stride(3) != 1:
        raise ValueError(
            f"the middle-value codes must be rows of {value_bytes} contiguous bytes (head_dim {head_dim} at {bits} "
            f"bits); got shape {tuple(values.shape)}, strides {values.stride()}"
        )
    blocks = -(-middle // cache.block_size)
    expected = {
        "key": ((batch, chunks, chunk), 2, blocks, cache.key_scales, cache.key_zeros),
        "value": ((batch, values.shape[1], head_dim // cache.group_size), 2, middle, cache.value_scales,
                  cache.value_zeros),
    }  # fmt: skip
    for name, (shape, axis, least, scales, zeros) in expected.items():
        fits = (
            scales.is_floating_point()
            and zeros.is_floating_point()
            and scales.shape == zeros.shape
            and scales.stride() == zeros.stride()
            and scales.dim() == 4
            and (*scales.shape[:axis], *scales.shape[axis + 1 :]) == shape
            and scales.shape[axis] >= least
            and scales.stride(3) == 1
        )
        if not fits:
            raise ValueError(
                f"the {name} scales and zeros must be float tensors of one layout, [{', '.join(map(str, shape[:2]))}, "
                f">= {least}, {shape[2]}] with contiguous rows; got scales {tuple(scales.shape)} {scales.dtype} "
                f"strides {scales.stride()}, zeros {tuple(zeros.shape)} {zeros.dtype} strides {zeros.stride()}"
            )


def _split_args(
    query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, cache_strides: tuple, new: NewTokens | None,
    new_valid: torch.Tensor | None, out_part: torch.Tensor, lse_part: torch.Tensor, scaling: float, split_tokens: int,
    middle_splits: int, tuning: DecodeTuning,
) -> tuple:  # fmt: skip
    """`_leank_decode_kernel`'s arguments up to its constexprs, in order; `cache_strides` as `_cache_signature` gives
    them, partial results contiguous. Without new tokens (or their flags, or a device middle length, or a quantized
    middle's scales) cache tensors stand in for them: the kernel is then compiled without reading them."""
    stored, quantized = _parts(cache)
    sink_strides, _, _, middle_key_strides, middle_value_strides, _, window_strides, _, valid_strides, *scales = (
        cache_strides
    )
    batch = query.shape[0]
    layout = stored.layout
    if quantized is None:
        scale_args = (
            stored.middle_keys, stored.middle_keys, 0, 0, 0, stored.middle_values, stored.middle_values, 0, 0, 0,
        )  # fmt: skip
    else:
        scale_args = (
            quantized.key_scales, quantized.key_zeros, *scales[0][:3],
            quantized.value_scales, quantized.value_zeros, *scales[2][:3],
        )  # fmt: skip
    cache = stored  # the tensors of the PrunedKV from here on
    if new is None:
        new_tensors, new_strides = (cache.recent_keys, cache.recent_values), (0, 0, 0, 0)
    else:
        new_tensors = (new.keys, new.values)
        new_strides = (new.keys.stride(0), new.keys.stride(1), new.values.stride(0), new.values.stride(1))
    return (
        query, query.stride(0), query.stride(1),
        cache.sink_keys, cache.sink_values, cache.sink_lengths, *sink_strides[:3], cache.sink_keys.shape[2],
        cache.middle_keys, *middle_key_strides[:2],
        cache.middle_values, *middle_value_strides[:3],
        *scale_args,
        cache.middle_start, cache.middle_start if cache.middle_length is None else cache.middle_length,
        cache.middle_len,
        cache.recent_keys, cache.recent_values, cache.recent_valid, *window_strides[:3], valid_strides[0],
        cache.recent_keys.shape[2],
        *new_tensors, cache.recent_valid if new_valid is None else new_valid, *new_strides,
        layout.row_heads_table, layout.row_offsets_table, layout.channel_table, layout.value_rows,
        out_part, lse_part, *_partial_strides(out_part),
        scaling * _LOG2E, batch, split_tokens, middle_splits, tuning.full_split_tokens,
    )  # fmt: skip


def _partial_strides(out_part: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Strides (batch, head, split) of the contiguous partial outputs `[B, Hq, splits, D]`, then (batch, head) of
    their log-sum-exps `[B, Hq, splits]`, from the shape alone (no `stride()` calls on the hot path)."""
    _, num_q_heads, splits, head_dim = out_part.shape
    return num_q_heads * splits * head_dim, splits * head_dim, head_dim, num_q_heads * splits, splits
