"""The decode launcher's one door into Triton's internals, and the way back to Triton's public JIT launch.

Two things `decode.py` does are not Triton's public API and have changed between Triton versions: launching a compiled
kernel directly (`compiled[grid](*args, stream=...)`, which skips the JIT's per-call binding, specialisation and cache
lookup, about half of a decode call's host time: BENCHMARKS.md, section 2a), and reading a compiled kernel's registers
and shared memory (`_init_handles`, `n_regs`, `metadata.shared`) to count the programs a multiprocessor holds, which
the split plan fills. `fast_kernel` checks that a compiled kernel and Triton's driver have everything these read; only
kernels it passes are launched directly or measured. With a Triton that lacks any of it, every launch goes through
`kernel[grid](...)` and the plan counts one program per multiprocessor: the same attention, slower, and one warning.

Only names are checked, not the direct launch's calling convention (every parameter positional, constexprs too):
`tests/test_triton_decode.py` runs the direct launch on CUDA against the reference.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import triton

if TYPE_CHECKING:
    from triton.compiler import CompiledKernel
    from triton.runtime import JITFunction

# What the fast path reads: on a compiled kernel, then on it once loaded (`_init_handles` sets `n_regs`), on Triton's
# active driver, and among the device properties that driver gives.
_KERNEL_NEEDS = ("__getitem__", "_init_handles", "metadata.num_warps", "metadata.shared")
_LOADED_KERNEL_NEEDS = ("n_regs",)
_DRIVER_NEEDS = ("get_current_device", "get_current_stream", "utils.get_device_properties")
_DEVICE_PROPERTIES = ("max_num_regs", "max_shared_mem")

# What the first compiled kernel to fail the check lacked; once set, the fast path stays closed in this process.
_lacking: list[str] = []


def fast_kernel(launched: object) -> CompiledKernel | None:
    """`launched` (what a JIT launch or warm-up returned) if the fast path may launch and measure it, else None.

    None without a warning where nothing was compiled (Triton's interpreter returns no kernel); the first compiled
    kernel that lacks something the fast path reads closes it, with a warning that names what is missing.
    """
    if launched is None or _lacking:
        return None
    driver = triton.runtime.driver.active
    lacking = [f"CompiledKernel.{name}" for name in _KERNEL_NEEDS if not _has(launched, name)]
    lacking += [f"driver.active.{name}" for name in _DRIVER_NEEDS if not _has(driver, name)]
    if not lacking:
        launched._init_handles()  # loads the binary, as its first direct launch would
        lacking += [f"CompiledKernel.{name}" for name in _LOADED_KERNEL_NEEDS if not _has(launched, name)]
        properties = driver.utils.get_device_properties(driver.get_current_device())
        lacking += [f"device property {key!r}" for key in _DEVICE_PROPERTIES if key not in properties]
    if lacking:
        _lacking.extend(lacking)
        warnings.warn(
            f"leank_hf: this Triton ({triton.__version__}) lacks {', '.join(lacking)}; the decode kernel launches "
            "through Triton's JIT from now on, with a split plan for one program per multiprocessor (same results, "
            "slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return launched


def _has(obj: object, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def launch(
    kernel: JITFunction, compiled: CompiledKernel | None, grid: tuple[int, ...], args: tuple, constexprs: dict,
    options: dict, stream: int | None,
) -> CompiledKernel | None:  # fmt: skip
    """Launch `kernel[grid]` on `args` (its parameters before the constexprs). Through `compiled` when given: a kernel
    `fast_kernel` passed, compiled for arguments specialised like these, on `stream` (`current_stream`). Returns the
    compiled kernel to pass next time (None where the fast path is closed: then every launch is a JIT launch)."""
    if compiled is not None:
        # The compiled launcher takes a three-dimensional grid and every parameter, constexprs too.
        compiled[(*grid, 1, 1)[:3]](*args, *constexprs.values(), stream=stream)
        return compiled
    return fast_kernel(kernel[grid](*args, **constexprs, **options))


def current_stream(device: int) -> int:
    """The stream Triton's JIT launches on for `device`, which a direct launch must be given."""
    return triton.runtime.driver.active.get_current_stream(device)


def resident_programs(compiled: CompiledKernel | None, device: torch.device) -> int:
    """How many programs of `compiled` (a kernel `fast_kernel` passed) one multiprocessor holds at once, by registers
    and shared memory, as Triton's fused-softmax tutorial computes it; 1 without one."""
    if compiled is None:
        return 1
    properties = triton.runtime.driver.active.utils.get_device_properties(device.index)
    threads = compiled.metadata.num_warps * properties.get("warpSize", 32)
    by_registers = properties["max_num_regs"] // max(1, compiled.n_regs * threads)
    by_shared_memory = properties["max_shared_mem"] // max(1, compiled.metadata.shared)
    return max(1, min(by_registers, by_shared_memory))
