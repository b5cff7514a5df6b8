"""Mask learning: the student against the full model and against real LeanK decoding, STE, the callback, resume."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from leank_hf import LeanKCache, LeanKMasks, select_channels
from leank_hf.compat import cache_kwargs
from leank_hf.training import (
    LeanKMaskCallback,
    MaskLearner,
    make_retrieval_dataset,
    prepare_for_mask_learning,
    student_attention,
)
from leank_hf.training.recipe import MaskLearningArguments
from leank_hf.training.student_attention import masked_answer_attention

from .conftest import FAMILIES, tiny_llama, tiny_model
from .helpers import answer_batch
from .tolerances import assert_close

SINK, RECENT = 4, 8


def test_teacher_sees_each_row_as_an_unpadded_forward_would():
    """The re-laid batch (left-padded prompts, right-padded answers of different lengths) changes nothing: the
    teacher's answer states equal a plain forward of each row alone."""
    model = tiny_model("llama")
    learner = prepare_for_mask_learning(model, sink=SINK, recent=RECENT)
    for pad_left in (True, False):
        batch = answer_batch(model.config.vocab_size, [30, 19, 25], answer=5, pad_left=pad_left, seed=4)
        batch["labels"][1, -1 if pad_left else 23] = -100  # row 1's answer is a token shorter
        teacher, _ = hidden_states_of(learner, batch)
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
            answer = (labels != -100).nonzero().flatten()
            with torch.no_grad():
                alone = model.base_model(input_ids=ids[None]).last_hidden_state[0, answer]
            torch.testing.assert_close(teacher[row, : len(answer)], alone, rtol=0, atol=2e-5)


def hidden_states_of(learner: MaskLearner, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) final hidden states of the answer tokens in one learner forward."""
    captured = []
    handle = learner.model.base_model.register_forward_hook(lambda m, i, out: captured.append(out.last_hidden_state))
    try:
        learner(**batch)
    finally:
        handle.remove()
    return captured[1], captured[2]  # prefill, teacher, student


def balanced_scales(learner: MaskLearner, seed: int = 0) -> torch.Tensor:
    """Scales whose top half in every head is clearly above the rest, so a 50 % global selection keeps half of
    every head and no head is fully pruned."""
    generator = torch.Generator().manual_seed(seed)
    shape = learner.channel_scales.shape
    order = torch.rand(shape, generator=generator).argsort(-1)
    high = torch.rand(shape, generator=generator) * 0.4 + 0.6
    low = torch.rand(shape, generator=generator) * 0.4
    return torch.where(order < shape[-1] // 2, high, low)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("pad_left", [True, False])
def test_student_equals_the_full_model_when_every_scale_is_one(family, pad_left):
    model = tiny_model(family)
    learner = prepare_for_mask_learning(model, sink=SINK, recent=RECENT)
    batch = answer_batch(model.config.vocab_size, [30, 19], answer=5, pad_left=pad_left)
    output = learner(**batch)
    assert output.distillation < 1e-10
    teacher, student = hidden_states_of(learner, batch)
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_binary_student_is_exactly_leank_decoding(family):
    """Training and inference agree: the binary-stage student's hidden states equal those of `generate`-style
    decoding of the answer tokens, one at a time, on a LeanKCache with the exported masks (block size 1, so the
    window is exactly `recent` past tokens), fully pruned heads included."""
    model = tiny_model(family)
    learner = prepare_for_mask_learning(model, sink=SINK, recent=RECENT)
    with torch.no_grad():
        learner.channel_scales.uniform_(0, 1, generator=torch.Generator().manual_seed(1))
        learner.channel_scales[0, 0] *= 0.01  # this head loses every channel
    learner.stage, learner.keep_ratio = "binary", 0.4
    masks = learner.export_masks().replace(block_size=1)
    assert (masks.kept_counts[masks.pruned_layers] == 0).any(), "exercise fully pruned heads"
    prompt, answer = 33, 6
    batch = answer_batch(model.config.vocab_size, [prompt], answer=answer, pad_left=True, seed=2)
    _, student = hidden_states_of(learner, batch)

    ids = batch["input_ids"]
    cache = LeanKCache(masks, model)
    with torch.no_grad():
        model.base_model(input_ids=ids[:, :prompt], **cache_kwargs(cache), use_cache=True)
        decoded = torch.cat([
            model.base_model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).last_hidden_state
            for t in range(prompt, prompt + answer)
        ], dim=1)  # fmt: skip
    torch.testing.assert_close(student, decoded, rtol=0, atol=2e-5)


def naive_answer_attention(query, key, value, allowed, middle, multiplier, dropped, scaling):
    """One query at a time, straight from the definition, in float64."""
    batch, q_heads, queries, _ = query.shape
    group = q_heads // key.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            for a in range(queries):
                keys = key[b, kv].double().clone()
                keys[middle[b, a]] = keys[middle[b, a]] * multiplier[kv].double()
                visible = allowed[b, a].clone()
                if dropped is not None and dropped[kv]:
                    visible &= ~middle[b, a]
                scores = (keys[visible] @ query[b, h, a].double()) * scaling
                out[b, h, a] = scores.softmax(-1) @ value[b, kv][visible].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_masked_answer_attention_matches_the_definition(dtype, group, monkeypatch):
    monkeypatch.setattr(student_attention, "_MAX_SCORES", 2 * 4 * group * 40)  # several chunks of answer queries
    generator = torch.Generator().manual_seed(group)
    batch, heads, queries, keys, dim = 2, 2, 7, 40, 32
    query = torch.randn(batch, heads * group, queries, dim, generator=generator).to(dtype)
    key = torch.randn(batch, heads, keys, dim, generator=generator).to(dtype)
    value = torch.randn(batch, heads, keys, dim, generator=generator).to(dtype)
    positions = torch.arange(keys)
    allowed = (positions[None, None] <= positions[keys - queries :, None]).expand(batch, queries, keys).clone()
    allowed[1, :, :3] = False  # row 1 is left-padded
    middle = (positions[None, None] >= 5) & (positions[keys - queries :, None] - positions[None, None] > 10)
    middle = middle.expand(batch, queries, keys)
    multiplier = torch.rand(heads, dim, generator=generator)
    dropped = torch.tensor([False, True])
    out = masked_answer_attention(query, key, value, allowed[:, None], middle, multiplier, dropped, 0.2)
    expected = naive_answer_attention(query, key, value, allowed, middle, multiplier, dropped, 0.2)
    assert_close(out, expected, dtype)


def test_straight_through_gradient_is_the_gradient_of_the_binary_mask():
    """Binary stage: the forward sees only the binarised mask, and d loss / d scale equals d loss / d mask."""
    model = tiny_model("llama")
    batch = answer_batch(model.config.vocab_size, [36], answer=4, pad_left=True)
    binary = prepare_for_mask_learning(model, sink=SINK, recent=RECENT)
    with torch.no_grad():
        binary.channel_scales.copy_(balanced_scales(binary))
    binary.stage, binary.keep_ratio = "binary", 0.5
    hard = binary.binary_mask().float()
    assert (hard.sum(-1) == 16).all()

    as_mask = prepare_for_mask_learning(tiny_model("llama"), sink=SINK, recent=RECENT)
    with torch.no_grad():
        as_mask.channel_scales.copy_(hard)  # continuous stage with the 0/1 mask as scales
    for learner in (binary, as_mask):
        learner(**batch).loss.backward()  # l1_weight is 0 without the callback
    torch.testing.assert_close(binary.channel_scales.grad, as_mask.channel_scales.grad, rtol=1e-5, atol=1e-9)
    assert binary.channel_scales.grad[hard == 0].abs().sum() > 0, "pruned channels still get a gradient"

    # Moving scales without changing which channels win changes nothing in the forward.
    loss = binary(**batch).distillation
    with torch.no_grad():
        binary.channel_scales.mul_(0.9)
    assert torch.equal(binary.binary_mask(), hard.bool())
    assert binary(**batch).distillation == loss


def test_export_is_exact_aligned_binarisation_and_skips_sliding_layers():
    model = tiny_model("gemma3")
    learner = prepare_for_mask_learning(model, sink=SINK, recent=RECENT)
    assert learner.channel_scales.shape == (1, 2, 32), "only the full-attention layer learns"
    with torch.no_grad():
        learner.channel_scales.uniform_(0, 1, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="no keep ratio"):
        learner.export_masks()
    masks = learner.export_masks(keep_ratio=0.5, align=16)
    assert isinstance(masks, LeanKMasks) and masks.keep_ratio == 0.5 and masks.align == 16
    assert masks.channel_mask[[0, 2]].all(), "sliding layers keep every channel"
    expected = select_channels(learner.full_scales(), 0.5, 16, layers=[1])
    assert torch.equal(masks.channel_mask, expected)
    assert (masks.sink, masks.recent, masks.model_type, masks.method["name"]) == (
        SINK,
        RECENT,
        "gemma3_text",
        "learned",
    )
    LeanKCache(masks, model)


def test_a_model_from_a_local_folder_records_no_base_model(tmp_path):
    """Its `name_or_path` is the folder, which is no Hub id; a Hub id or an explicit base_model is recorded."""
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert prepare_for_mask_learning(model).export_masks(keep_ratio=0.5).base_model is None
    model.config._name_or_path = "org/tiny"  # as after from_pretrained("org/tiny")
    assert prepare_for_mask_learning(model).base_model == "org/tiny"
    assert prepare_for_mask_learning(model, base_model="org/base").base_model == "org/base"


def test_checkpoints_hold_only_the_scales():
    learner = prepare_for_mask_learning(tiny_model("llama"))
    state = learner.state_dict()
    assert list(state) == ["channel_scales"]
    other = prepare_for_mask_learning(tiny_model("llama", seed=1))
    with torch.no_grad():
        state["channel_scales"].mul_(0.5)
    result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.channel_scales, learner.channel_scales)
    assert not any(p.requires_grad for p in learner.model.parameters())


def test_bad_batches_are_named():
    learner = prepare_for_mask_learning(tiny_model("llama"))
    batch = answer_batch(96, [10], answer=3, pad_left=True)
    with pytest.raises(ValueError, match="needs labels"):
        learner(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="no answer tokens"):
        learner(input_ids=batch["input_ids"], labels=torch.full_like(batch["input_ids"], -100))
    with pytest.raises(ValueError, match="labels shape"):
        learner(input_ids=batch["input_ids"], labels=batch["labels"][:, :-1])


# ------------------------------------------------------------------------------------------------ Trainer
class Recorder(TrainerCallback):
    """Scale range and learner state after every step, and the optimizer's learning rate."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        scales = model.channel_scales.detach()
        moments = [s.get("step") for s in optimizer.state.values()]
        self.steps.append({
            "step": state.global_step, "min": float(scales.min()), "max": float(scales.max()), "stage": model.stage,
            "l1_weight": model.l1_weight, "lr": optimizer.param_groups[0]["lr"],
            "adam_step": float(moments[0]) if moments else None,
        })  # fmt: skip


def train_tiny(tokenizer, output_dir, *, max_steps=8, stage1=4, save_steps=100, resume=None, callbacks=(),
               schedule="constant", learning_rate=0.2, keep_ratio=0.5):  # fmt: skip
    model = tiny_llama(len(tokenizer))
    learner = prepare_for_mask_learning(model, sink=SINK, recent=16)
    data = make_retrieval_dataset(tokenizer, lengths=(100, 160), n=16, facts=(1, 2))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=learning_rate,
        lr_scheduler_type=schedule, logging_steps=2, save_steps=save_steps, report_to="none", seed=0, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    callback = LeanKMaskCallback(keep_ratio=keep_ratio, align=16, stage1_steps=stage1, stage2_steps=max_steps - stage1,
                                 l1_weight=0.5, stage2_learning_rate=0.05)  # fmt: skip
    trainer = Trainer(model=learner, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer),
                      callbacks=[callback, *callbacks])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return learner, trainer


def test_trainer_runs_both_stages_clamps_logs_and_saves(smollm2_tokenizer, tmp_path):
    recorder = Recorder()
    # Stage 1's L1 penalty moves every scale down by the learning rate per Adam step: 1 - 4 x 0.3 < 0 at step 4.
    learner, trainer = train_tiny(smollm2_tokenizer, tmp_path, save_steps=3, callbacks=[recorder], learning_rate=0.3)
    steps = recorder.steps
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert all(s["min"] >= 0.0 and s["max"] <= 1.0 for s in steps), "scales stay in [0, 1]"
    assert steps[3]["min"] == 0.0, "the clamp held scales that stage 1 pushed below 0"
    assert steps[0]["max"] < 1.0, "the L1 penalty pulls scales down in stage 1"
    assert [s["stage"] for s in steps] == ["continuous"] * 4 + ["binary"] * 4
    assert [s["l1_weight"] for s in steps] == [0.5] * 4 + [0.0] * 4
    assert [s["lr"] for s in steps] == [0.3] * 4 + [0.05] * 4
    assert steps[4]["adam_step"] == 1, "stage 2 starts with fresh optimizer moments"

    logged = [entry for entry in trainer.state.log_history if "leank/distillation" in entry]
    assert [entry["leank/stage"] for entry in logged] == [1, 1, 2, 2]
    assert logged[-1]["leank/kept_ratio"] == 0.5

    for directory in (tmp_path / "checkpoint-3" / "leank_masks", tmp_path / "checkpoint-6" / "leank_masks"):
        assert LeanKMasks.from_pretrained(directory).keep_ratio == 0.5
        assert (directory / "mask_heatmap.png").read_bytes().startswith(b"\x89PNG")
    final = LeanKMasks.from_pretrained(tmp_path / "leank_masks")
    assert final == learner.export_masks()
    assert final.method["stage1_steps"] == 4 and final.method["l1_weight"] == 0.5


@pytest.mark.parametrize("checkpoint", [4, 6], ids=["at-the-stage-switch", "in-stage-2"])
def test_resume_continues_without_losing_a_step(smollm2_tokenizer, tmp_path, checkpoint):
    straight, _ = train_tiny(smollm2_tokenizer, tmp_path / "straight")
    train_tiny(smollm2_tokenizer, tmp_path / "stopped", max_steps=8, save_steps=2)
    resumed, trainer = train_tiny(
        smollm2_tokenizer, tmp_path / "stopped", resume=str(tmp_path / "stopped" / f"checkpoint-{checkpoint}")
    )
    assert trainer.state.global_step == 8
    assert torch.equal(resumed.channel_scales, straight.channel_scales)


class StopAfter(TrainerCallback):
    """Ends training after `step` optimizer steps, as an interrupted run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


class Poison(TrainerCallback):
    """Puts a NaN into optimizer step `step`: into a scale before its forward (so the loss is NaN), or into a gradient
    before the optimizer steps (so the loss was finite but a scale turns NaN)."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.where == "loss" and state.global_step + 1 == self.step:
            with torch.no_grad():
                model.channel_scales[0, 0, 0] = float("nan")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.where == "scales" and state.global_step + 1 == self.step:
            model.channel_scales.grad[0, 0, 0] = float("nan")


@pytest.mark.parametrize(
    ("where", "message"),
    [("loss", "the loss became NaN or infinite in optimizer step 3"),
     ("scales", "1 of the 128 channel scales are NaN or infinite in optimizer step 3")],
)  # fmt: skip
def test_divergence_stops_training_at_its_step(smollm2_tokenizer, tmp_path, where, message):
    """Without the check, the clamp keeps NaN, Trainer logs the NaN loss as a finite mean and the run exports
    arbitrary masks."""
    with pytest.raises(FloatingPointError, match=rf"{message}\. Training diverged: lower the learning rate"):
        train_tiny(smollm2_tokenizer, tmp_path, save_steps=2, callbacks=[Poison(3, where)])
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert not (tmp_path / "leank_masks").exists(), "no masks exported from a diverged run"


def test_resuming_from_nan_scales_is_refused(smollm2_tokenizer, tmp_path):
    train_tiny(smollm2_tokenizer, tmp_path, save_steps=2, callbacks=[StopAfter(2)])
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    state = load_file(weights)
    state["channel_scales"][1, 0, :3] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match=r"3 of the 128 channel scales .* when training starts at step 2\. "
                                                 r"Resume from an earlier checkpoint"):  # fmt: skip
        train_tiny(smollm2_tokenizer, tmp_path, resume=str(tmp_path / "checkpoint-2"))


def test_a_keep_ratio_that_keeps_no_channel_is_refused(smollm2_tokenizer, tmp_path):
    # 0.01 of the tiny model's 128 prunable channels is 1.28 channels: no group of 16.
    with pytest.raises(ValueError, match=r"keep_ratio 0.01 .* smallest ratio that keeps one group is 0.125"):
        train_tiny(smollm2_tokenizer, tmp_path, keep_ratio=0.01)


def test_callback_names_schedule_and_model_mistakes(smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_steps=8"):
        _trainer_running_6_steps_for_8(smollm2_tokenizer, tmp_path).train()
    with pytest.raises(ValueError, match="keep_ratio"):
        LeanKMaskCallback(keep_ratio=0)
    with pytest.raises(TypeError, match="prepare_for_mask_learning"):
        LeanKMaskCallback().on_train_begin(None, None, None, model=tiny_model("llama"))


def _trainer_running_6_steps_for_8(tokenizer, output_dir) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), max_steps=6, report_to="none", use_cpu=True)
    return Trainer(model=prepare_for_mask_learning(tiny_llama(len(tokenizer))), args=args,
                   train_dataset=make_retrieval_dataset(tokenizer, lengths=(100, 120), n=4),
                   callbacks=[LeanKMaskCallback(stage1_steps=4, stage2_steps=4)])  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keep_ratio": 0}, r"keep_ratio must be in \(0, 1\], got 0"),
        ({"align": 0}, "align must be an integer > 0, got 0"),
        ({"stage1_steps": -1}, "stage1_steps must be an integer >= 0"),
        ({"stage2_steps": 0}, "stage2_steps must be an integer > 0"),
        ({"l1_weight": -0.1}, "l1_weight must be >= 0"),
        ({"stage2_learning_rate": float("nan")}, "stage2_learning_rate must be > 0, got nan"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"sink": -4}, "sink must be an integer from 0"),
        ({"lengths": [1024]}, r"lengths must be two token counts, the shortest and longest prompt \(MIN MAX\)"),
        ({"lengths": [900, 100]}, "lengths MIN MAX needs 0 < MIN <= MAX, got 900 100"),
        ({"examples": 0}, "examples must be an integer > 0"),
        ({"batch_size": 1.5}, "batch_size must be an integer > 0, got 1.5"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"base_model": "/tmp/model"}, "base_model '/tmp/model' is not a Hub repo id"),
    ],
)
def test_mask_learning_arguments_name_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MaskLearningArguments(**fields)


def test_the_recipe_takes_its_defaults_from_the_callback_and_the_data():
    """`train_masks` runs the callback's schedule on make_retrieval_dataset's default data, unless told otherwise:
    a default written again in MaskLearningArguments that disagrees fails here."""
    arguments = MaskLearningArguments()
    for field in dataclasses.fields(LeanKMaskCallback):
        assert getattr(arguments, field.name) == field.default, field.name
    data = inspect.signature(make_retrieval_dataset).parameters
    assert (tuple(arguments.lengths), arguments.examples) == (data["lengths"].default, data["n"].default)
