"""`train_masks`: the paper's recipe as one call (what `leank-hf train` runs), built from the public pieces."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from ..masks import LeanKMasks
from .callback import STAGE2_LEARNING_RATE, LeanKMaskCallback
from .data import make_retrieval_dataset
from .learner import prepare_for_mask_learning

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def train_masks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    keep_ratio: float = 0.3,
    align: int = 16,
    sink: int = 64,
    recent: int = 256,
    lengths: tuple[int, int] = (1024, 8192),
    examples: int = 2000,
    stage1_steps: int = 2000,
    stage2_steps: int = 200,
    learning_rate: float = 0.02,
    stage2_learning_rate: float = STAGE2_LEARNING_RATE,
    l1_weight: float = 0.06,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    save_steps: int = 200,
    logging_steps: int = 10,
    seed: int = 0,
    resume: bool = False,
    base_model: str | None = None,
) -> LeanKMasks:
    """Learn masks for `model` on `make_retrieval_dataset` data with `Trainer` + `LeanKMaskCallback`.

    Checkpoints (each with a loadable mask repo in `leank_masks/`) go to `output_dir/checkpoint-N`, the final mask
    repo to `output_dir/leank_masks`. `resume=True` continues from the newest checkpoint in `output_dir`.
    `base_model` is the Hub id recorded in the masks (default: the model's `name_or_path` if it is a Hub id, else
    none).
    The learning rate is constant within each stage: 0.02, then 0.002 (the paper's stage 2 uses 0.01, which made
    SmolLM2's masks worse than stage 1 alone; BENCHMARKS.md section 4).
    """
    if tokenizer.pad_token is None:
        # Only the collator pads; MaskLearner reads the attention mask, never the padding token's id.
        tokenizer.pad_token = tokenizer.eos_token
    learner = prepare_for_mask_learning(model, sink=sink, recent=recent, base_model=base_model)
    learner.training_record = {"data": f"make_retrieval_dataset(lengths={tuple(lengths)}, n={examples}, seed={seed})"}
    data = make_retrieval_dataset(tokenizer, lengths=lengths, n=examples, seed=seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=stage1_steps + stage2_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_steps=save_steps,
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every step uses the one trainable tensor
    )
    callback = LeanKMaskCallback(
        keep_ratio=keep_ratio, align=align, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
        l1_weight=l1_weight, stage2_learning_rate=stage2_learning_rate,
    )  # fmt: skip
    trainer = Trainer(
        model=learner,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return learner.export_masks()
