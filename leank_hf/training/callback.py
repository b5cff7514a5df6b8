"""`LeanKMaskCallback`: the two-stage LeanK schedule on top of a stock `transformers.Trainer`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checks import check_range
from ..masks.selection import DEFAULT_ALIGN, DEFAULT_KEEP_RATIO, kept_groups
from .learner import MaskLearner

logger = logging.getLogger(__name__)

MASKS_DIRNAME = "leank_masks"


@dataclass(eq=False)  # Trainer finds and removes its callbacks by identity, and they stay hashable
class LeanKMaskCallback(TrainerCallback):
    """Runs LeanK's two training stages on a `MaskLearner` inside `Trainer.train()`.

    Stage 1 (`stage1_steps` optimizer steps) trains continuous scales with the L1 penalty `l1_weight`. In stage 2 the
    forward uses the binarised scales instead: `keep_ratio` of the channels, per-head counts multiples of `align`,
    highest scales kept, recomputed from the current scales at every forward (so the selection can still change);
    the scales keep training through a straight-through estimator, without the penalty, at `stage2_learning_rate`
    (as the peak of the rest of Trainer's schedule) with fresh optimizer moments. After every optimizer step the
    scales are clamped to [0, 1]. Training stops with a `FloatingPointError` when a loss or a scale is NaN or infinite
    (resumed so, or after a step), rather than going on silently to export arbitrary masks. Each checkpoint gets a
    loadable mask repo (with its heatmap) in `checkpoint-N/leank_masks`, and the end of training one in
    `output_dir/leank_masks`. The stage follows `state.global_step`, so `resume_from_checkpoint` continues exactly
    where a run stopped. A `keep_ratio` that rounds to no group of `align` channels is refused when training starts.

    Logs (every `logging_steps`, next to Trainer's loss): `leank/distillation`, `leank/l1`, `leank/mean_scale`,
    `leank/kept_ratio` (channels with scale >= 0.5 in stage 1; the binary mask's share in stage 2) and
    `leank/stage`. They reach the progress bar's printout and `trainer_state.json`; the report integrations
    (TensorBoard, W&B), which Trainer calls before user callbacks, see only Trainer's own keys.

    The defaults are the paper's schedule (except `stage2_learning_rate`), and `train_masks` / `leank-hf train` take
    theirs from here.

    Args:
        keep_ratio: share of key channels the final masks keep (paper: 0.3).
        align: per-head kept counts are multiples of this (16 or 32 for the decode kernel).
        stage1_steps: steps of continuous training (paper: 2000).
        stage2_steps: steps of binary fine-tuning (paper: 200); `None` = all steps after stage 1. When set,
            `TrainingArguments.max_steps` must equal `stage1_steps + stage2_steps`.
        l1_weight: λ of the stage-1 penalty λ · mean(|scale|) (paper: 0.06).
        stage2_learning_rate: learning rate of stage 2; `None` keeps Trainer's schedule. The default 0.002 is what
            the project measured best; the paper's 0.01 made SmolLM2's masks worse than stage 1 alone.
    """

    keep_ratio: float = DEFAULT_KEEP_RATIO
    align: int = DEFAULT_ALIGN
    stage1_steps: int = 2000
    stage2_steps: int | None = 200
    l1_weight: float = 0.06
    # The paper uses 0.01, which made SmolLM2's masks worse than stage 1 alone (KL 0.025 vs 0.017 on held-out text,
    # retrieval 0.90 vs 1.00); 0.002 improved on stage 1 (KL 0.0093). BENCHMARKS.md section 4.
    stage2_learning_rate: float | None = 0.002

    def __post_init__(self) -> None:
        check_range(self.keep_ratio, 0, 1, name="keep_ratio", low_open=True)
        check_range(self.align, 0, name="align", low_open=True, integer=True)
        check_range(self.stage1_steps, 0, name="stage1_steps", integer=True)
        if self.stage2_steps is not None:
            check_range(self.stage2_steps, 0, name="stage2_steps", low_open=True, integer=True)
        check_range(self.l1_weight, 0, name="l1_weight")
        if self.stage2_learning_rate is not None:
            check_range(self.stage2_learning_rate, 0, name="stage2_learning_rate", low_open=True)

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        learner = _learner(kwargs["model"])
        if self.stage2_steps is not None and state.max_steps != self.stage1_steps + self.stage2_steps:
            raise ValueError(
                f"LeanKMaskCallback runs {self.stage1_steps} + {self.stage2_steps} steps but Trainer will run "
                f"{state.max_steps}; set TrainingArguments(max_steps={self.stage1_steps + self.stage2_steps})"
            )
        if state.global_step >= state.max_steps:
            raise ValueError(
                f"this run already finished (step {state.global_step} of {state.max_steps}); there is nothing to "
                f"resume. Its masks are in {os.path.join(args.output_dir, MASKS_DIRNAME)}"
            )
        if state.max_steps <= self.stage1_steps:
            raise ValueError(
                f"Trainer runs {state.max_steps} steps, so stage 2 (after step {self.stage1_steps}) would never start; "
                f"raise max_steps or lower stage1_steps"
            )
        channels = learner.channel_scales.numel()
        if kept_groups(self.keep_ratio, channels, self.align) == 0:
            raise ValueError(
                f"keep_ratio {self.keep_ratio} of the {channels} key channels LeanK prunes in this model rounds to no "
                f"group of {self.align} (align): the masks would keep no channel at all. The smallest ratio that "
                f"keeps one group is {self.align / channels:.4g}"
            )
        learner.keep_ratio, learner.align = self.keep_ratio, self.align
        learner.binary_mask()  # a bad align fails now, not at the first checkpoint
        _stop_if_not_finite(
            learner,
            f"when training starts at step {state.global_step}",
            "Resume from an earlier checkpoint (resume_from_checkpoint=.../checkpoint-N), one saved before the "
            "values went bad, or start afresh",
        )
        learner.training_record = {
            **learner.training_record,
            "stage1_steps": self.stage1_steps,
            "stage2_steps": state.max_steps - self.stage1_steps,
            "l1_weight": self.l1_weight,
            "learning_rate": args.learning_rate,
            "stage2_learning_rate": self.stage2_learning_rate,
            "align": self.align,
            "sink": learner.sink,
            "recent": learner.recent,
        }
        # On resume past the switch, the restored optimizer and scheduler already belong to stage 2; resuming at the
        # switch itself leaves it to on_step_begin, as in an uninterrupted run.
        self._set_stage(learner, binary=state.global_step > self.stage1_steps)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        learner = _learner(kwargs["model"])
        if state.global_step == self.stage1_steps and learner.stage == "continuous":
            self._set_stage(learner, binary=True)
            optimizer = kwargs["optimizer"]
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    optimizer.state.pop(parameter, None)  # fine-tuning starts with fresh moments
            if self.stage2_learning_rate is not None:
                _restart_schedule(optimizer, kwargs.get("lr_scheduler"), self.stage2_learning_rate)
            _say(args, state, f"LeanK: stage 2 begins; the forward now keeps the top {self.keep_ratio:.1%} of key "
                              "channels by scale (straight-through)")  # fmt: skip

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        learner = _learner(kwargs["model"])
        learner.clamp_scales_()
        _stop_if_not_finite(
            learner,
            f"in optimizer step {state.global_step + 1}",  # Trainer counts the step after this event
            "Training diverged: lower the learning rate (stage 1: learning_rate, --lr; stage 2: "
            "stage2_learning_rate, --stage2-lr), or resume from an earlier checkpoint",
        )

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        learner = _learner(kwargs["model"])
        terms = learner.pop_terms()
        if logs is None or not terms:
            return
        scales = learner.channel_scales.detach()
        kept = learner.binary_mask().float().mean() if learner.stage == "binary" else (scales >= 0.5).float().mean()
        extra = {
            "leank/distillation": terms["distillation"],
            "leank/l1": terms["l1"],
            "leank/mean_scale": float(scales.mean()),
            "leank/kept_ratio": float(kept),
            "leank/stage": 2 if learner.stage == "binary" else 1,
        }
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            _learner(kwargs["model"]).export_masks().save_pretrained(os.path.join(checkpoint, MASKS_DIRNAME))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            _learner(kwargs["model"]).export_masks().save_pretrained(os.path.join(args.output_dir, MASKS_DIRNAME))

    # ---------------------------------------------------------------------------------------------- helpers
    def _set_stage(self, learner: MaskLearner, *, binary: bool) -> None:
        learner.stage = "binary" if binary else "continuous"
        learner.l1_weight = 0.0 if binary else self.l1_weight


def _stop_if_not_finite(learner: MaskLearner, when: str, advice: str) -> None:
    """Raise if a loss term or a scale is NaN or infinite. Otherwise training would go on silently: the clamp keeps
    NaN, Trainer logs a NaN loss as the running mean, and `select_channels` would export arbitrary masks."""
    if not learner.terms_are_finite():
        raise FloatingPointError(f"LeanK mask learning: the loss became NaN or infinite {when}. {advice}.")
    bad = int((~torch.isfinite(learner.channel_scales)).sum())
    if bad:
        raise FloatingPointError(
            f"LeanK mask learning: {bad} of the {learner.channel_scales.numel()} channel scales are NaN or infinite "
            f"{when}. {advice}."
        )


def _restart_schedule(optimizer: Any, scheduler: Any, learning_rate: float) -> None:
    """Make `learning_rate` the peak of the rest of the schedule: Trainer's schedulers (LambdaLR) multiply their
    `base_lrs` by a factor of the step, so replacing `base_lrs` keeps the schedule's shape and survives resume (the
    scheduler's state holds them)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = learning_rate * (lambdas[i](scheduler.last_epoch) if lambdas else 1.0)
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what Trainer logs


def _say(args: TrainingArguments, state: TrainerState, message: str) -> None:
    """Print a line on the main process the way Trainer's progress bar prints its logs."""
    logger.info(message)
    if state.is_world_process_zero and not args.disable_tqdm:
        tqdm.write(message)


def _learner(model: Any) -> MaskLearner:
    if not isinstance(model, MaskLearner):
        raise TypeError(
            f"LeanKMaskCallback trains a MaskLearner, but Trainer's model is {type(model).__name__}; "
            "wrap the model first: Trainer(model=prepare_for_mask_learning(model), ...)"
        )
    return model
