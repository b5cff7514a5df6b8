"""`train_masks`: the paper's recipe as one call (what `leank-hf train` runs), built from the public pieces; its
settings, `MaskLearningArguments`, hold every default and help text of that command."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from ..checks import check_range
from ..eval.retrieval import MIXTURES, TRAINING_EXAMPLES, TRAINING_LENGTHS, check_lengths, make_retrieval_dataset
from ..masks.hub import as_hub_id
from ..masks.leank_masks import LeanKMasks
from ..windows import DEFAULT_WINDOWS, WindowConfig
from .callback import LeanKMaskCallback
from .learner import prepare_for_mask_learning

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class MaskLearningArguments:
    """Settings of `train_masks`; `leank-hf train` makes its options from these fields with `HfArgumentParser`.

    The schedule's defaults are `LeanKMaskCallback`'s (the paper's, except stage 2's learning rate: 0.002, the
    measured best, where the paper's 0.01 made SmolLM2's masks worse than stage 1 alone), the windows' are
    `WindowConfig`'s, and the data's `make_retrieval_dataset`'s. The learning rate is constant within each stage.

    Raises:
        ValueError: naming the field, for a value out of range (checked before any model is loaded).
    """

    keep_ratio: float = field(
        default=LeanKMaskCallback.keep_ratio, metadata={"help": "share of key channels the masks keep (paper: 0.3)"}
    )
    align: int = field(default=LeanKMaskCallback.align, metadata={"help": "per-head kept counts are multiples of this"})
    sink: int = field(
        default=DEFAULT_WINDOWS.sink, metadata={"help": "leading tokens that keep full keys (saved with the masks)"}
    )
    recent: int = field(
        default=DEFAULT_WINDOWS.recent, metadata={"help": "latest tokens that keep full keys (saved with the masks)"}
    )
    lengths: list[int] = field(
        default_factory=lambda: list(TRAINING_LENGTHS),
        metadata={
            "help": "shortest and longest prompt of the retrieval examples, in tokens",
            "metavar": ("MIN", "MAX"),
        },
    )
    examples: int = field(default=TRAINING_EXAMPLES, metadata={"help": "retrieval examples in the training set"})
    mixture: str = field(
        default="ruler",
        metadata={
            "help": "training tasks: ruler (RULER-style task families in Alice and As You Like It) or facts (the "
            "shipped SmolLM2 masks' data: key-value facts in Alice)",
            "choices": list(MIXTURES),
        },
    )
    stage1_steps: int = field(
        default=LeanKMaskCallback.stage1_steps, metadata={"help": "steps of continuous scales (paper: 2000)"}
    )
    stage2_steps: int = field(
        default=LeanKMaskCallback.stage2_steps,
        metadata={"help": "steps of binary masks, straight-through (paper: 200)"},
    )
    learning_rate: float = field(
        default=0.02, metadata={"help": "stage-1 learning rate (paper: 0.02)", "aliases": ["--lr"]}
    )
    stage2_learning_rate: float = field(
        default=LeanKMaskCallback.stage2_learning_rate,
        metadata={
            "help": "stage-2 learning rate (paper: 0.01, which made SmolLM2's masks worse than stage 1 alone; "
            "BENCHMARKS.md section 4)",
            "aliases": ["--stage2-lr"],
        },
    )
    l1_weight: float = field(
        default=LeanKMaskCallback.l1_weight, metadata={"help": "stage-1 L1 penalty weight, lambda (paper: 0.06)"}
    )
    batch_size: int = field(default=1, metadata={"help": "examples per device and step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint (with its leank_masks/) every this many steps"})
    logging_steps: int = field(default=10, metadata={"help": "log losses every this many steps"})
    seed: int = field(default=0, metadata={"help": "seed of the training data and of Trainer"})
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id recorded in the masks (unset: the Hub id the model was loaded from; leank-hf train also "
            "tries the repo a local GGUF file names as its source; else none)"
        },
    )

    def __post_init__(self) -> None:
        self.callback()  # checks keep_ratio, align, the stages' steps, l1_weight and stage2_learning_rate
        WindowConfig(self.sink, self.recent)  # checks sink and recent
        check_lengths(self.lengths)
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {', '.join(MIXTURES)}, got {self.mixture!r}")
        check_range(self.learning_rate, 0, name="learning_rate", low_open=True)
        for name in ("examples", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            check_range(getattr(self, name), 0, name=name, low_open=True, integer=True)
        check_range(self.seed, 0, name="seed", integer=True)
        if self.base_model is not None and as_hub_id(self.base_model) is None:
            raise ValueError(
                f"base_model {self.base_model!r} is not a Hub repo id (org/name or name); give the Hub id of the model "
                "the masks are for, or leave it unset"
            )

    def callback(self) -> LeanKMaskCallback:
        """The schedule of these settings, for `Trainer`."""
        return LeanKMaskCallback(
            keep_ratio=self.keep_ratio, align=self.align, stage1_steps=self.stage1_steps,
            stage2_steps=self.stage2_steps, l1_weight=self.l1_weight, stage2_learning_rate=self.stage2_learning_rate,
        )  # fmt: skip


def train_masks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    arguments: MaskLearningArguments | None = None,
    *,
    resume: bool = False,
) -> LeanKMasks:
    """Learn masks for `model` on `make_retrieval_dataset` data with `Trainer` + `LeanKMaskCallback`.

    Checkpoints (each with a loadable mask repo in `leank_masks/`) go to `output_dir/checkpoint-N`, the final mask
    repo to `output_dir/leank_masks`. `arguments` (default: `MaskLearningArguments()`, the paper's recipe with the
    measured best stage-2 learning rate) sets everything else; `resume=True` continues from the newest checkpoint in
    `output_dir`.
    """
    arguments = arguments or MaskLearningArguments()
    if tokenizer.pad_token is None:
        # Only the collator pads; MaskLearner reads the attention mask, never the padding token's id.
        tokenizer.pad_token = tokenizer.eos_token
    learner = prepare_for_mask_learning(
        model, sink=arguments.sink, recent=arguments.recent, base_model=arguments.base_model
    )
    lengths, examples, seed, mixture = tuple(arguments.lengths), arguments.examples, arguments.seed, arguments.mixture
    learner.training_record = {
        "data": f"make_retrieval_dataset(lengths={lengths}, n={examples}, seed={seed}, mixture={mixture!r})"
    }
    data = make_retrieval_dataset(tokenizer, lengths=lengths, n=examples, seed=seed, mixture=mixture)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=arguments.stage1_steps + arguments.stage2_steps,
        per_device_train_batch_size=arguments.batch_size,
        gradient_accumulation_steps=arguments.gradient_accumulation_steps,
        learning_rate=arguments.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=arguments.logging_steps,
        save_steps=arguments.save_steps,
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every step uses the one trainable tensor
    )
    trainer = Trainer(
        model=learner,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[arguments.callback()],
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return learner.export_masks()
