"""Mask learning under `torchrun` (DDP through Trainer's own accelerate support), for tests/test_distributed.py.

Run: torchrun --nproc_per_node N tests/ddp_worker.py OUTPUT_DIR MAX_STEPS [RESUME_CHECKPOINT]
Every rank checks after every optimizer step that its scales equal rank 0's, and rank 0 writes the final scales.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from leank_hf.embedded import embedded_model_path, load_tokenizer
from leank_hf.training import LeanKMaskCallback, make_retrieval_dataset, prepare_for_mask_learning

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from tests.conftest import tiny_llama


class RanksAgree(TrainerCallback):
    """After every step, all ranks hold bit-identical scales."""

    def __init__(self) -> None:
        self.checked = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        scales = model.channel_scales.detach().clone()
        gathered = [torch.empty_like(scales) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, scales)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                raise AssertionError(f"step {state.global_step}: rank {rank}'s scales differ from rank 0's")
        self.checked += 1


def main() -> None:
    output_dir, max_steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    tokenizer = load_tokenizer(*embedded_model_path())
    learner = prepare_for_mask_learning(tiny_llama(len(tokenizer)), sink=4, recent=16)
    agree = RanksAgree()
    trainer = Trainer(
        model=learner,
        args=TrainingArguments(
            output_dir=output_dir,
            max_steps=max_steps,
            per_device_train_batch_size=2,
            learning_rate=0.1,
            lr_scheduler_type="constant",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            ddp_backend="gloo",
            dataloader_pin_memory=False,
        ),
        train_dataset=make_retrieval_dataset(tokenizer, lengths=(100, 160), n=32),
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=[LeanKMaskCallback(keep_ratio=0.5, stage1_steps=3, stage2_steps=max_steps - 3, l1_weight=0.2), agree],
    )
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        save_file({"channel_scales": learner.channel_scales.detach().contiguous(),
                   "steps": torch.tensor([trainer.state.global_step, agree.checked, trainer.args.world_size])},
                  f"{output_dir}/final.safetensors")  # fmt: skip


if __name__ == "__main__":
    main()
