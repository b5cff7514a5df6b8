"""Mask learning with several processes through the stock path (`torchrun` + Trainer's DDP), on CPU processes.

The GPU version of this (NCCL, 2 GPUs, samples/s scaling) needs a two-GPU machine; see BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(processes: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(WORKER), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_keep_identical_scales_and_resume_on_one(tmp_path, smollm2_tokenizer):
    torchrun(2, str(tmp_path / "two"), "6")
    final = load_file(tmp_path / "two" / "final.safetensors")
    assert final["steps"].tolist() == [6, 6, 2], "6 steps, ranks compared after each, 2 processes"
    assert float(final["channel_scales"].min()) >= 0 and float(final["channel_scales"].max()) <= 1

    # Stop the 2-process run at step 4 (stage 2) and finish it with a single process.
    shutil.copytree(tmp_path / "two" / "checkpoint-4", tmp_path / "one" / "checkpoint-4")
    torchrun(1, str(tmp_path / "one"), "6", str(tmp_path / "one" / "checkpoint-4"))
    resumed = load_file(tmp_path / "one" / "final.safetensors")
    assert resumed["steps"].tolist() == [6, 2, 1], "continued from step 4 on one process"
    assert (tmp_path / "one" / "leank_masks" / "leank_config.json").is_file()
