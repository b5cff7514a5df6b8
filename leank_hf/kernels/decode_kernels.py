"""The Triton decode kernels, `@triton.jit` code only (`decode.py` checks the inputs, plans the splits and launches
them): one query token per row over a pruned LeanK cache, reading only the kept bytes.

Split-KV (flash-decoding) on a one-dimensional grid: first the middle programs, each one a run of middle tokens of
one (row, KV head) pair whose head keeps channels (fully pruned heads get none), then the full-width programs, each a
share of one (row, KV head)'s sink and window tokens. The query heads of a KV head (GQA) are the rows of one tile, so
every K/V byte is loaded once per KV head. Middle keys come from the chunk-major store (see `ChannelLayout`) through
one channel tile as wide as the layer's widest head: heads of any kept count share one launch and lanes past a head's
count are masked in whole chunks (they fetch nothing). Validity needs no per-token load: each row's real middle tokens
are the slots from its `middle_start` on (a per-token flag read would be a synchronous byte load the loop pipeline
cannot prefetch; it cost ~15 % of bandwidth). Scores are base-2 (`qk_scale` is the model's scaling times log2 e).
Each split writes its output and log-sum-exp; `_merge_kernel` combines them, launched on Hopper as a programmatic
dependent so that it starts while the last splits run.

The middle may be stored quantized (`BITS` 8 or 4, see `quantization.py`; 16 is the float store): the middle programs
then load the uint8 codes and their fp16 scales and zeros, and dequantize in registers (`_dequantized`). Every
constexpr branch on `BITS` keeps the float store's code exactly as it was without them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_softmax_update(scores, values, m_i, l_i, acc):
    """Fold a tile of base-2 scores `[G, N]` (-inf = no weight) and its values `[N, D]` into the running state."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key must not produce NaN
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
    return m_new, l_i, acc


@triton.jit
def _code_offsets(lanes, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """Where each of `lanes` (element indices in `[0, WIDTH)` of a stored row of `WIDTH` elements) sits in the row as
    stored: itself in a float or 8-bit row; at 4 bits byte `lane % (WIDTH / 2)` (quantization.py packs halves)."""
    if BITS == 4:
        lanes = lanes % (WIDTH // 2)
    return lanes


@triton.jit
def _dequantized(raw, lanes, scales, zeros, mask, dtype, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """`zero + code * scale` in fp32, then in `dtype` (the query's, for `tl.dot`), of the bytes `raw` loaded for
    `lanes` of rows of `WIDTH` codes (broadcastable to `raw`); `scales` and `zeros` point at each element's. At 4 bits
    lanes of the first half of a row are the low nibbles, of the second half the high ones."""
    codes = raw
    if BITS == 4:
        codes = (raw >> (lanes // (WIDTH // 2) * 4).to(tl.uint8)) & 0xF
    scale = tl.load(scales, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros, mask=mask, other=0.0).to(tl.float32)
    return (zero + codes.to(tl.float32) * scale).to(dtype)


@triton.jit
def _middle_tiles(
    q_rows, g_mask, channel_row, head_start, kept, k_base, v_base, stride_mkc, stride_mvn, ks_base, kz_base,
    stride_ksc, stride_ksk, vs_base, vz_base, stride_vsn, row_start, first, last, m_i, l_i, acc, qk_scale,
    CHUNK: tl.constexpr, KMAX: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
    KEY_BLOCK: tl.constexpr, VALUE_GROUP: tl.constexpr,
):  # fmt: skip
    """Attend over middle tokens `[first, last)` of one head (real from `row_start` on), on its kept channels
    (`channel_row`: their indices, padded to `KMAX`). In the chunk-major store lane c of token n sits at chunk
    c // CHUNK, offset n * CHUNK + c % CHUNK, so each chunk of a tile is one contiguous `BLOCK_N * CHUNK` run.

    Quantized (`BITS` 8 or 4), a token's row in a chunk is `CHUNK * BITS / 8` bytes and lane c's code is its byte
    `_code_offsets(c % CHUNK)`; its scale and zero are those of lane c in key block n // KEY_BLOCK (`ks_base`: the
    row's `[chunks, blocks, CHUNK]` scales). A value row's code of channel d is byte `_code_offsets(d)` (`v_base` has
    those offsets), its scale and zero at `[n, d // VALUE_GROUP]` from `vs_base`. Every tile is dequantized in
    registers and cast to the query's dtype before `tl.dot`, the precision the float store keeps its keys and values
    in. (Folding the scales into the query instead would need a tile within one key block, but tiles start at any
    multiple of 16 tokens and blocks may be any length: a tile may span several.) At 4 bits each byte of a key tile is
    loaded for both of its lanes, so one `[KMAX, BLOCK_N]` tile and one dot serve both widths; the two loads of a byte
    fall in the same cache line, so memory traffic is the packed bytes."""
    offs_c = tl.arange(0, KMAX)
    c_mask = (offs_c // CHUNK) < (kept // CHUNK)
    channels = tl.load(channel_row + offs_c)
    q_kept = tl.load(q_rows + channels[None, :], mask=g_mask[:, None] & c_mask[None, :], other=0.0)
    if BITS == 16:
        k_lanes = k_base + ((head_start // CHUNK + offs_c // CHUNK) * stride_mkc + offs_c % CHUNK)[:, None]
    else:
        chunks = head_start // CHUNK + offs_c // CHUNK
        lanes = offs_c % CHUNK
        k_lanes = k_base + (chunks * stride_mkc + _code_offsets(lanes, CHUNK, BITS))[:, None]
        ks_lanes = (chunks * stride_ksc + lanes)[:, None]
        offs_d = tl.arange(0, D)
        vs_columns = (offs_d // VALUE_GROUP)[None, :]
    for start in range(first, last, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < last
        if BITS == 16:
            k = tl.load(k_lanes + offs_n[None, :] * CHUNK, mask=c_mask[:, None] & in_range[None, :], other=0.0)
        else:
            k_mask = c_mask[:, None] & in_range[None, :]
            raw = tl.load(k_lanes + offs_n[None, :] * (CHUNK * BITS // 8), mask=k_mask, other=0)
            blocks = (offs_n // KEY_BLOCK)[None, :] * stride_ksk  # a tile may straddle blocks: per token
            k = _dequantized(
                raw, lanes[:, None], ks_base + ks_lanes + blocks, kz_base + ks_lanes + blocks, k_mask, q_kept.dtype,
                CHUNK, BITS,
            )  # fmt: skip
        real = in_range & (offs_n >= row_start)
        scores = tl.where(real[None, :], tl.dot(q_kept, k) * qk_scale, float("-inf"))
        if BITS == 16:
            v = tl.load(v_base + offs_n[:, None] * stride_mvn, mask=in_range[:, None], other=0.0)
        else:
            raw = tl.load(v_base + offs_n[:, None] * stride_mvn, mask=in_range[:, None], other=0)
            v_groups = offs_n[:, None] * stride_vsn + vs_columns
            v = _dequantized(
                raw, offs_d[None, :], vs_base + v_groups, vz_base + v_groups, in_range[:, None], q_kept.dtype, D, BITS
            )
        m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _full_width_tiles(
    q, k_base, v_base, stride_kn, stride_vn, valid_base, stride_valid, begin, end, limit, m_i, l_i, acc, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, VALID_IS_COUNT: tl.constexpr,
):  # fmt: skip
    """Attend over full-width tokens `[begin, end)`; valid if `index < limit` (sink) or by a per-token flag (window)."""
    offs_d = tl.arange(0, D)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        if VALID_IS_COUNT:
            valid = in_range & (offs_n < limit)
        else:
            valid = in_range & (tl.load(valid_base + offs_n * stride_valid, mask=in_range, other=0) != 0)
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, k) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _new_token(
    q, new_k, new_v, new_valid, win_k, win_v, win_valid, write_flag, m_i, l_i, acc, qk_scale, D: tl.constexpr,
    NEW_VALID: tl.constexpr,
):  # fmt: skip
    """Write this step's token of one (row, KV head) into its window slot (`write_flag`: its flag too) and fold it
    into the running state. No other program of the launch reads that slot."""
    offs_d = tl.arange(0, D)
    k = tl.load(new_k + offs_d)
    v = tl.load(new_v + offs_d)
    tl.store(win_k + offs_d, k)
    tl.store(win_v + offs_d, v)
    scores = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * qk_scale
    if NEW_VALID:
        valid = tl.load(new_valid)
        scores = tl.where(valid != 0, scores, float("-inf"))
    else:
        valid = tl.full([], 1, tl.int1)
    if write_flag:
        tl.store(win_valid, valid.to(win_valid.dtype.element_ty))
    m_new = tl.maximum(m_i, scores)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i, acc


# Lengths change every step: never specialise on them (Triton otherwise recompiles when one becomes divisible by 16,
# in the middle of decoding).
@triton.jit(
    do_not_specialize=[
        "batch", "num_rows", "sink_slots", "middle_len", "window_len", "split_tokens", "middle_splits",
        "full_split_tokens", "stride_wvalb", "stride_ob", "stride_oh", "stride_lb", "stride_lh",
    ]
)  # fmt: skip
def _leank_decode_kernel(
    Q, stride_qb, stride_qh,
    SinkK, SinkV, SinkLen, stride_sb, stride_sh, stride_sn, sink_slots,
    MidK, stride_mkb, stride_mkc,
    MidV, stride_mvb, stride_mvh, stride_mvn,
    KeyScales, KeyZeros, stride_ksb, stride_ksc, stride_ksk,
    ValueScales, ValueZeros, stride_vsb, stride_vsh, stride_vsn,
    MidStart, MidLen, middle_len,
    WinK, WinV, WinValid, stride_wb, stride_wh, stride_wn, stride_wvalb, window_len,
    NewK, NewV, NewValid, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    RowHeads, RowOffsets, ChannelTable, num_rows,
    OutPart, LsePart, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    qk_scale, batch, split_tokens, middle_splits, full_split_tokens,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    CHUNK: tl.constexpr, KMAX: tl.constexpr, BLOCK_N: tl.constexpr, LET_MERGE_START: tl.constexpr,
    NEW_TOKEN: tl.constexpr, NEW_VALID: tl.constexpr, MIDDLE_LENGTH_ON_DEVICE: tl.constexpr, BITS: tl.constexpr,
    KEY_BLOCK: tl.constexpr, VALUE_GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if LET_MERGE_START:  # the merge may launch once every program has started (it waits for their results)
        tl.extra.cuda.gdc_launch_dependents()
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, D)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)

    middle_rows = batch * num_rows
    if pid < middle_rows * middle_splits:
        # Middle programs exist only for heads that keep channels (value rows), split-major.
        split = pid // middle_rows
        b = pid % middle_rows // num_rows
        row = pid % num_rows
        h = tl.load(RowHeads + row)
        head_start = tl.multiple_of(tl.load(RowOffsets + row), CHUNK)
        kept = tl.load(RowOffsets + row + 1) - head_start
        row_start = tl.load(MidStart + b)
        if MIDDLE_LENGTH_ON_DEVICE:  # the stores' capacity planned the grid; the stored length is read here
            middle_len = tl.load(MidLen).to(tl.int32)
        heads = h * GROUP + offs_g
        q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
        first = tl.maximum(split * split_tokens, row_start // BLOCK_N * BLOCK_N)  # skip tiles with no real token
        last = tl.minimum(split * split_tokens + split_tokens, middle_len)
        vs_row = b * stride_vsb + row * stride_vsh  # (the scales' arguments are stand-ins for a float store)
        m_i, l_i, acc = _middle_tiles(
            q_rows, g_mask, ChannelTable + row * KMAX, head_start, kept, MidK + b * stride_mkb,
            MidV + b * stride_mvb + row * stride_mvh + _code_offsets(offs_d, D, BITS)[None, :], stride_mkc, stride_mvn,
            KeyScales + b * stride_ksb, KeyZeros + b * stride_ksb, stride_ksc, stride_ksk, ValueScales + vs_row,
            ValueZeros + vs_row, stride_vsn, row_start, first, last, m_i, l_i, acc, qk_scale, CHUNK, KMAX, D, BLOCK_N,
            BITS, KEY_BLOCK, VALUE_GROUP,
        )  # fmt: skip
    else:
        # The remaining programs share every head's full-width tokens: the sink, then the window (ending with this
        # step's token), `full_split_tokens` tokens of their concatenation each.
        full = pid - middle_rows * middle_splits
        full_split = full // (batch * NUM_KV_HEADS)
        b = full % (batch * NUM_KV_HEADS) // NUM_KV_HEADS
        h = full % NUM_KV_HEADS
        split = middle_splits + full_split
        heads = h * GROUP + offs_g
        q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
        lo = full_split * full_split_tokens
        hi = lo + full_split_tokens
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)  # [G, D]
        sink_len = tl.load(SinkLen + b)
        sink_offset = b * stride_sb + h * stride_sh
        m_i, l_i, acc = _full_width_tiles(
            q, SinkK + sink_offset, SinkV + sink_offset, stride_sn, stride_sn, SinkLen, 0,
            tl.minimum(lo, sink_slots), tl.minimum(hi, sink_slots), sink_len, m_i, l_i, acc, qk_scale, D, BLOCK_N, True,
        )  # fmt: skip
        window_offset = b * stride_wb + h * stride_wh
        stored = window_len - 1 if NEW_TOKEN else window_len  # with NEW_TOKEN the last slot is written here
        m_i, l_i, acc = _full_width_tiles(
            q, WinK + window_offset, WinV + window_offset, stride_wn, stride_wn, WinValid + b * stride_wvalb, 1,
            tl.maximum(lo - sink_slots, 0), tl.minimum(hi - sink_slots, stored), 0, m_i, l_i, acc, qk_scale, D,
            BLOCK_N, False,
        )  # fmt: skip
        if NEW_TOKEN:  # noqa: SIM102 (a constexpr: this branch is compiled only with new tokens)
            if (sink_slots + stored >= lo) & (sink_slots + stored < hi):  # the one program whose share holds it
                m_i, l_i, acc = _new_token(
                    q, NewK + b * stride_nkb + h * stride_nkh, NewV + b * stride_nvb + h * stride_nvh, NewValid + b,
                    WinK + window_offset + stored * stride_wn, WinV + window_offset + stored * stride_wn,
                    WinValid + b * stride_wvalb + stored, h == 0, m_i, l_i, acc, qk_scale, D, NEW_VALID,
                )  # fmt: skip

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_ptrs = OutPart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out, mask=g_mask[:, None])
    tl.store(LsePart + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits", "middle_splits", "stride_ob", "stride_oh", "stride_lb", "stride_lh"])
def _merge_kernel(
    OutPart, LsePart, Out, HeadOffsets, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
    num_splits, middle_splits, NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, WAIT_FOR_SPLITS: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (row, query head) by their log-sum-exp, `BLOCK_D` channels of the output per program;
    a head with no key at all outputs zeros. A head that keeps no channel had no middle programs: only its
    full-width splits were written. With `WAIT_FOR_SPLITS` it was launched as a programmatic dependent of the split
    kernel (it starts while that kernel's last programs run) and waits for their results here."""
    b = tl.program_id(0) // NUM_Q_HEADS
    hq = tl.program_id(0) % NUM_Q_HEADS
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    part_base = OutPart + b * stride_ob + hq * stride_oh
    lse_base = LsePart + b * stride_lb + hq * stride_lh
    kept = tl.load(HeadOffsets + hq // GROUP + 1) - tl.load(HeadOffsets + hq // GROUP)
    first = tl.where(kept > 0, 0, middle_splits)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if WAIT_FOR_SPLITS:
        tl.extra.cuda.gdc_wait()
    for start in range(first, num_splits, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        in_range = offs_s < num_splits
        lse = tl.load(lse_base + offs_s, mask=in_range, other=float("-inf"))
        parts = tl.load(part_base + offs_s[:, None] * stride_os + offs_d[None, :], mask=in_range[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weights = tl.exp2(lse - m_safe)
        alpha = tl.exp2(m - m_safe)
        total = total * alpha + tl.sum(weights, axis=0)
        acc = acc * alpha + tl.sum(parts * weights[:, None], axis=0)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_fb + hq * stride_fh + offs_d, out.to(Out.dtype.element_ty))
