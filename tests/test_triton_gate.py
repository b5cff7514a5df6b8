"""The gate to Triton's internals (`triton_gate.py`): a decoder launches the compiled kernels directly where Triton has
everything that reads, and through Triton's JIT, with the same results, where it lacks any of it.

Triton's interpreter compiles nothing, so on the CPU a stand-in plays the compiled kernel a JIT launch returns on CUDA:
its direct launch runs the interpreted kernel on the arguments it is given, and it lacks what a test names, as a
Triton version without that attribute would. On CUDA the installed Triton's own compiled kernels must pass the gate.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import triton

from leank_hf.kernels import triton_gate
from leank_hf.kernels.decode import DecodeTuning, LeanKDecoder
from leank_hf.kernels.decode_kernels import _leank_decode_kernel, _merge_kernel

from .helpers import KERNEL_DEVICE, KERNEL_DTYPES, random_cache, reference
from .tolerances import assert_close

on_the_cpu = pytest.mark.skipif(
    KERNEL_DEVICE == "cuda", reason="the stand-in's direct launch runs Triton's interpreter"
)


class StandIn:
    """An object of Triton's whose attributes named in `lacking` are missing, as in a Triton version without them."""

    def __init__(self, lacking: tuple[str, ...]) -> None:
        self.lacking = lacking

    def __getattribute__(self, name: str):
        if name in object.__getattribute__(self, "lacking"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)


class CompiledStandIn(StandIn):
    """What a JIT launch returns on CUDA, as far as the gate reads it. Indexed by a three-dimensional grid, it gives a
    direct launch that takes every parameter positionally (constexprs too) and runs the interpreted kernel."""

    def __init__(self, run, direct_launches: list, lacking: tuple[str, ...]) -> None:
        super().__init__(lacking)
        self.run_interpreted, self.direct_launches = run, direct_launches
        metadata = {"num_warps": 4, "shared": 2048}
        self.metadata = SimpleNamespace(**{k: v for k, v in metadata.items() if f"metadata.{k}" not in lacking})

    def _init_handles(self) -> None:
        if "n_regs" not in self.lacking:
            self.n_regs = 128

    def __getitem__(self, grid: tuple[int, int, int]):
        assert len(grid) == 3

        def direct_launch(*args, stream):
            self.direct_launches.append(stream)
            self.run_interpreted(*args, grid=grid, warmup=False)

        return direct_launch


class DriverStandIn(StandIn):
    """Triton's active driver, as far as the gate reads it (an H100's properties)."""

    def __init__(self, lacking: tuple[str, ...]) -> None:
        super().__init__(lacking)
        properties = {"max_num_regs": 65536, "max_shared_mem": 232448, "multiprocessor_count": 132, "warpSize": 32}
        properties = {k: v for k, v in properties.items() if k not in lacking}
        self.utils = SimpleNamespace(get_device_properties=lambda device: properties)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 7


@pytest.fixture
def launches(monkeypatch):
    """A process whose gate has not closed yet, and a recorder of the decode kernels' launches: `jit` (through
    Triton's JIT) and `direct` (through a compiled kernel). On the CPU, `launches.triton(lacking)` makes the JIT
    launches return a `CompiledStandIn` lacking `lacking`, with a `DriverStandIn` lacking it too."""
    monkeypatch.setattr(triton_gate, "_lacking", [])
    recorded = SimpleNamespace(jit=[], direct=[])
    runs = {kernel: kernel.run for kernel in (_leank_decode_kernel, _merge_kernel)}
    compiled = {}

    def jit_launch(kernel, *args, **kwargs):
        if not kwargs["warmup"]:  # warm-ups (the split plan's, on CUDA) launch nothing
            recorded.jit.append(kernel)
        return runs[kernel](*args, **kwargs) or compiled.get(kernel)

    for kernel in runs:
        monkeypatch.setattr(kernel, "run", lambda *a, kernel=kernel, **k: jit_launch(kernel, *a, **k))

    def triton_lacking(lacking: tuple[str, ...]) -> None:
        for kernel, run in runs.items():
            compiled[kernel] = CompiledStandIn(run, recorded.direct, lacking)
        monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: DriverStandIn(lacking)))

    recorded.triton = triton_lacking
    return recorded


def decode_three_steps(decoder: LeanKDecoder) -> None:
    """Three steps of one cache (new queries): the first sets the decoder up, the others change nothing it
    specialises on. Each must match the reference."""
    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(2, 2, 64, 16, 3, 70, 6, dtype, seed=61)
    gen = torch.Generator().manual_seed(62)
    for _ in range(3):
        query = torch.randn(2, 4, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype)
        assert_close(decoder(query, cache, 0.1), reference(query, cache, 0.1), dtype)


@on_the_cpu
def test_gate_launches_compiled_kernels_directly_where_triton_has_its_internals(launches):
    launches.triton(lacking=())
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="leank_hf", category=RuntimeWarning)
        decode_three_steps(decoder)
    assert launches.jit == [_leank_decode_kernel, _merge_kernel], "only the first step goes through the JIT"
    assert launches.direct == [7] * 4, "the later steps launch both kernels directly, on the driver's stream"


LACKING = [
    "_init_handles",
    "n_regs",
    "metadata.shared",
    "metadata.num_warps",
    "__getitem__",
    "get_current_stream",
    "get_current_device",
    "utils",
    "max_num_regs",
]


@on_the_cpu
@pytest.mark.parametrize("lacking", LACKING)
def test_gate_falls_back_to_the_jit_launch_where_triton_lacks_an_internal(launches, lacking):
    """A Triton without any one of the attributes the fast path reads: every launch goes through the JIT, the results
    are the same, and one warning names what is missing (not one per launch)."""
    launches.triton(lacking=(lacking,))
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    with pytest.warns(RuntimeWarning, match=lacking.split(".")[-1]) as warned:
        decode_three_steps(decoder)
    assert len([warning for warning in warned if "leank_hf" in str(warning.message)]) == 1
    assert launches.jit == [_leank_decode_kernel, _merge_kernel] * 3
    assert launches.direct == []
    assert decoder._split_kernel is None


def test_closed_gate_launches_every_step_through_the_jit(launches, monkeypatch):
    """Once the gate has closed (on CUDA too), no decoder launches directly; the attention is the same."""
    monkeypatch.setattr(triton_gate, "_lacking", ["CompiledKernel.n_regs"])
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    decode_three_steps(decoder)
    assert launches.jit == [_leank_decode_kernel, _merge_kernel] * 3


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="only CUDA compiles kernels")
def test_installed_triton_passes_the_gate(launches):
    """The installed Triton has every internal the fast path reads: the decoder keeps its compiled kernels, launches
    the later steps directly, and nothing warns."""
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="leank_hf", category=RuntimeWarning)
        decode_three_steps(decoder)
    assert triton_gate._lacking == []
    assert decoder._split_kernel is not None
    assert launches.jit == [_leank_decode_kernel, _merge_kernel]
