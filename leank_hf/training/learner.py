"""`MaskLearner`: a frozen model plus trainable per-channel key scales, distilled against its own full attention."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..architectures import ModelSpec
from ..cache.attention import attending_with
from ..compat import cache_kwargs
from ..eval.retrieval import IGNORE_INDEX
from ..masks.hub import as_hub_id
from ..masks.leank_masks import LeanKMasks
from ..masks.selection import DEFAULT_ALIGN, select_channels
from ..windows import DEFAULT_WINDOWS, WindowConfig
from . import student_attention
from .prompt_cache import PromptCache
from .student_attention import StudentStep, student_step

Stage = Literal["continuous", "binary"]


@dataclass
class MaskLearnerOutput(ModelOutput):
    """`loss` = `distillation` + `l1_weight` · `l1`; the terms are detached, for logging."""

    loss: torch.Tensor | None = None
    distillation: torch.Tensor | None = None
    l1: torch.Tensor | None = None


@dataclass(frozen=True)
class _AnswerBatch:
    """A batch re-laid so that every row's prompt ends (left-padded) where its answer starts (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    answer_ids: torch.Tensor  # [B, A]
    answer_mask: torch.Tensor  # [B, A] real answer-span tokens
    loss_mask: torch.Tensor  # [B, A] tokens whose hidden states are distilled (labelled)
    prompt_lengths: torch.Tensor  # [B] real prompt tokens


class MaskLearner(nn.Module):
    """The student of LeanK mask learning; train it with `transformers.Trainer` and `LeanKMaskCallback`.

    Each forward prefills the prompt once (exact, no gradients), then runs the answer tokens twice on top of it: as
    the teacher with full attention, and as the student, whose answer queries see full keys for the first `sink`
    tokens, themselves and the `recent` tokens before them (what the decode cache keeps at least), and `k ⊙ scale`
    for the tokens in between. The loss is the mean squared error
    between the two final hidden states on answer (labelled) tokens plus `l1_weight · mean(|scale|)`. Gradients
    flow only through the answer tokens, so a long prompt costs one no-grad forward.

    With every scale at 1 the student equals the teacher (exactly in fp32; in bf16/fp16 the student's fp32 attention and
    the teacher's SDPA differ by rounding, a loss of ~1e-5).

    Only `channel_scales` (`[full-attention layers, kv_heads, head_dim]`, initialised to 1) trains; the model is
    frozen, kept in eval mode, and left out of `state_dict()` so checkpoints hold the scales alone.
    In the ``"binary"`` stage the forward uses the binarised mask (`export_masks`) with a straight-through
    estimator, and heads that keep no channel drop their middle tokens, exactly as at decode.
    """

    accepts_loss_kwargs = False

    def __init__(
        self,
        model: PreTrainedModel,
        sink: int = DEFAULT_WINDOWS.sink,
        recent: int = DEFAULT_WINDOWS.recent,
        base_model: str | None = None,
    ) -> None:
        super().__init__()
        WindowConfig(sink, recent)  # refuses windows out of range
        self.spec = ModelSpec.from_model(model)
        self.model = model.requires_grad_(False).eval()
        self.sink, self.recent = sink, recent
        # The Hub id the masks are for. A model loaded from a local folder only knows that folder, which is no Hub id
        # even where it is shaped like one.
        name = getattr(model.config, "_name_or_path", None)
        self.base_model = base_model or (None if not name or os.path.exists(name) else as_hub_id(name))
        self.layers = self.spec.leank_layers
        self._row = {layer: row for row, layer in enumerate(self.layers)}
        device = model.device
        shape = (len(self.layers), self.spec.num_kv_heads, self.spec.head_dim)
        self.channel_scales = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        # Set by LeanKMaskCallback: the schedule of the method.
        self.stage: Stage = "continuous"
        self.l1_weight = 0.0
        self.keep_ratio: float | None = None
        self.align = DEFAULT_ALIGN
        self.training_record: dict[str, Any] = {}  # how the masks were trained, saved in their `method`
        self._terms: list[torch.Tensor] = []
        self.register_state_dict_post_hook(_drop_model_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_model_weights)
        student_attention.register()

    def train(self, mode: bool = True) -> MaskLearner:
        super().train(mode)
        self.model.eval()  # the frozen model never trains (no dropout)
        return self

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
    ) -> MaskLearnerOutput:
        """`labels` marks the answer tokens (others `-100`), as for causal-LM fine-tuning; any padding side works."""
        if labels is None:
            raise ValueError(
                "MaskLearner needs labels marking the answer tokens (-100 elsewhere), e.g. from make_retrieval_dataset"
            )
        batch = _split_prompt_and_answer(input_ids, attention_mask, labels)
        prompt_positions = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        answer_positions = batch.prompt_lengths[:, None] + torch.arange(
            batch.answer_ids.shape[1], device=input_ids.device
        )
        key_positions = torch.cat([prompt_positions.masked_fill(batch.prompt_mask == 0, -1), answer_positions], dim=1)
        full_mask = torch.cat([batch.prompt_mask, batch.answer_mask], dim=1)
        middle = (key_positions[:, None, :] >= self.sink) & (
            answer_positions[:, :, None] - key_positions[:, None, :] > self.recent
        )
        with attending_with(self.model, student_attention.STUDENT_IMPLEMENTATION):  # borrowed for this forward
            teacher, student = self._teacher_and_student(batch, prompt_positions, answer_positions, full_mask, middle)
        weight = batch.loss_mask[..., None].float()
        distillation = ((student.float() - teacher.float()) ** 2 * weight).sum() / (weight.sum() * student.shape[-1])
        l1 = self.channel_scales.abs().mean()
        loss = distillation + self.l1_weight * l1
        if self.training:
            self._terms.append(torch.stack([distillation.detach(), l1.detach()]))
        return MaskLearnerOutput(loss=loss, distillation=distillation.detach(), l1=l1.detach())

    def _teacher_and_student(
        self,
        batch: _AnswerBatch,
        prompt_positions: torch.Tensor,
        answer_positions: torch.Tensor,
        full_mask: torch.Tensor,
        middle: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer tokens' final hidden states, `[B, A, hidden]`, of the full model and of the student, after one
        prefill of the prompts that both share."""
        decoder = self.model.base_model
        cache = PromptCache(self.spec.num_layers)
        with torch.no_grad():
            decoder(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, position_ids=prompt_positions,
                    **cache_kwargs(cache), use_cache=True)  # fmt: skip
            cache.freeze()
            answer_inputs = {
                "input_ids": batch.answer_ids,
                "attention_mask": full_mask,
                "position_ids": answer_positions,
                "use_cache": True,
                **cache_kwargs(cache),
            }
            teacher = decoder(**answer_inputs).last_hidden_state
        with student_step(StudentStep(middle, self._channels_function())):
            student = decoder(**answer_inputs).last_hidden_state
        return teacher, student

    def _channels_function(self):
        """`layer -> (multiplier, dropped)` for this forward's stage (see `StudentStep.channels`)."""
        scales = self.channel_scales
        if self.stage == "continuous":
            return lambda layer: (scales[self._row[layer]], None) if layer in self._row else None
        hard = self.binary_mask().to(scales.device, scales.dtype)
        straight_through = hard + (scales - scales.detach())  # exactly the binary mask forward; d/d scale backward
        dropped = hard.sum(-1) == 0
        return lambda layer: (
            (straight_through[self._row[layer]], dropped[self._row[layer]]) if layer in self._row else None
        )

    # --------------------------------------------------------------------------------------------- masks
    def full_scales(self) -> torch.Tensor:
        """`[layers, kv_heads, head_dim]` scales on the CPU, 1 for layers LeanK does not prune."""
        full = torch.ones(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim)
        full[self.layers] = self.channel_scales.detach().float().cpu()
        return full

    def binary_mask(self, keep_ratio: float | None = None, align: int | None = None) -> torch.Tensor:
        """`[full-attention layers, kv_heads, head_dim]` bool: the highest-scale channels at `keep_ratio`."""
        keep_ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        if keep_ratio is None:
            raise ValueError("no keep ratio set: pass keep_ratio=, or train with LeanKMaskCallback(keep_ratio=...)")
        mask = select_channels(self.full_scales(), keep_ratio, align or self.align, layers=self.layers)
        return mask[self.layers]

    def export_masks(self, keep_ratio: float | None = None, align: int | None = None) -> LeanKMasks:
        """The learned masks as `LeanKMasks` (save_pretrained / push_to_hub them)."""
        align = align or self.align
        mask = torch.ones(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, dtype=torch.bool)
        mask[self.layers] = self.binary_mask(keep_ratio, align)
        keep_ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        config = self.model.config
        method = {"name": "learned", "keep_ratio": keep_ratio, **self.training_record}
        return LeanKMasks(
            mask, sink=self.sink, recent=self.recent, align=align, layer_types=self.spec.layer_types,
            model_type=self.spec.model_type, base_model=self.base_model,
            base_model_revision=getattr(config, "_commit_hash", None), method=method,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ for the callback
    def clamp_scales_(self) -> None:
        """Project the scales back into [0, 1] (after every optimizer step)."""
        with torch.no_grad():
            self.channel_scales.clamp_(0.0, 1.0)

    def terms_are_finite(self) -> bool:
        """Whether every loss term of the training forwards since the last `pop_terms` is finite."""
        return not self._terms or bool(torch.isfinite(torch.stack(self._terms)).all())

    def pop_terms(self) -> dict[str, float]:
        """Mean loss terms of the training forwards since the last call (for logging)."""
        if not self._terms:
            return {}
        distillation, l1 = torch.stack(self._terms).mean(0).tolist()
        self._terms.clear()
        return {"distillation": distillation, "l1": l1}


def prepare_for_mask_learning(
    model: PreTrainedModel,
    sink: int = DEFAULT_WINDOWS.sink,
    recent: int = DEFAULT_WINDOWS.recent,
    base_model: str | None = None,
) -> MaskLearner:
    """Freeze `model` and wrap it with trainable per-channel key scales (see `MaskLearner`).

    Args:
        model: a supported causal LM (`leank_hf.SUPPORTED_MODEL_TYPES`); its weights stay frozen.
        sink: leading tokens that keep full keys (the masks are learned for, and saved with, this sink).
        recent: latest tokens that keep full keys.
        base_model: Hub id recorded in the exported masks (default: the model's `name_or_path` if it is a Hub id,
            as after `from_pretrained("org/name")`; a local folder is recorded as unknown, None).
    """
    return MaskLearner(model, sink=sink, recent=recent, base_model=base_model)


def _split_prompt_and_answer(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> _AnswerBatch:
    """Re-lay each row as [left padding, prompt | answer, right padding]; the answer runs from the first to the last
    labelled token, the prompt is every real token before it."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    labelled = (labels != IGNORE_INDEX) & real
    rows = []
    for row in range(input_ids.shape[0]):
        where = labelled[row].nonzero().flatten()
        if len(where) == 0:
            raise ValueError(f"row {row} has no answer tokens: its labels are all -100 (or padding)")
        first, last = int(where[0]), int(where[-1])
        before = real[row, :first]
        prompt = input_ids[row, :first][before]
        if len(prompt) == 0:
            raise ValueError(f"row {row} has no prompt before its first labelled token; LeanK masks need context")
        span = slice(first, last + 1)
        rows.append((prompt, input_ids[row, span], real[row, span], labelled[row, span]))
    prompt_len = max(len(r[0]) for r in rows)
    answer_len = max(len(r[1]) for r in rows)
    return _AnswerBatch(
        prompt_ids=_pad([r[0] for r in rows], prompt_len, left=True),
        prompt_mask=_pad([torch.ones_like(r[0]) for r in rows], prompt_len, left=True),
        answer_ids=_pad([r[1] for r in rows], answer_len, left=False),
        answer_mask=_pad([r[2].long() for r in rows], answer_len, left=False),
        loss_mask=_pad([r[3] for r in rows], answer_len, left=False),
        prompt_lengths=torch.tensor([len(r[0]) for r in rows], device=input_ids.device),
    )


def _pad(rows: list[torch.Tensor], length: int, *, left: bool) -> torch.Tensor:
    """Stack 1-D tensors into `[len(rows), length]`, zero (or False) padded on the left or the right."""
    out = rows[0].new_zeros(len(rows), length)
    for i, row in enumerate(rows):
        if left:
            out[i, length - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out


def _drop_model_weights(module: MaskLearner, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _ignore_missing_model_weights(module: MaskLearner, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("model.")]
