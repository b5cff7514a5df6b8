"""One tolerance table for every numeric comparison against a float64 reference."""

from __future__ import annotations

import torch

# Relative error ‖out − ref‖ / ‖ref‖ allowed per input dtype. fp32 lands far under 1e-3; bf16 (8 mantissa bits)
# and fp16 (11 bits) round q·k products and probabilities, which puts them between 1e-3 and 1e-2.
RELATIVE_ERROR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Assert a relative error within the table's bound for `dtype`, and print where results differ if not."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "output holds NaN or inf"
    error = (actual - expected).norm() / expected.norm().clamp(min=1e-12)
    bound = RELATIVE_ERROR[dtype]
    if error > bound:
        worst = (actual - expected).abs().flatten().argmax()
        raise AssertionError(
            f"relative error {error:.2e} > {bound:.0e} for {dtype}; worst element #{int(worst)}: "
            f"{actual.flatten()[worst]:.6f} vs {expected.flatten()[worst]:.6f}"
        )
