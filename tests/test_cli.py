"""The `leank-hf` command line: inspect, convert, push, generate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import gguf
import pytest
import torch
from safetensors.torch import save_file

import leank_hf
from leank_hf import SUPPORTED_MODEL_TYPES, LeanKMasks, WindowConfig
from leank_hf.cli import build_parser, main, settings
from leank_hf.eval import EvaluationArguments
from leank_hf.training import LeanKMaskCallback
from leank_hf.training.recipe import MaskLearningArguments

from .conftest import tiny_llama
from .helpers import RecordingApi, aligned_mask
from .hub_server import closed_port_url


def test_inspect_a_shipped_repo(capsys, tmp_path):
    assert main(["inspect", "llama-3.1-8b-instruct", "--context", "32768", "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "key channels kept: 31.2%; fully pruned KV heads: 47" in out
    assert "| 0 | 18.8% | 2 |" in out
    assert "K 68.1% saved, V 18.2% saved, KV 43.1% saved" in out
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")


def test_inspect_scales_with_batch_and_dtype(capsys):
    main(["inspect", "smollm2-135m-instruct", "--context", "4096", "--batch", "4", "--bytes-per-value", "4"])
    out = capsys.readouterr().out
    # 30 layers x 3 KV heads x 64 channels x 4096 tokens x 4 rows x 4 bytes x (K + V) = 720 MiB for DynamicCache.
    assert "of 720.0 MiB" in out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_convert_round_trip(tmp_path, suffix, capsys):
    mask = aligned_mask(layers=4, heads=2, head_dim=64)
    source = tmp_path / f"mask{suffix}"
    if suffix == ".pth":
        torch.save(mask.to(torch.uint8), source)
    else:
        save_file({"channel_mask": mask.to(torch.uint8)}, source)
    args = ["convert", str(source), str(tmp_path / "repo"), "--align", "16", "--base-model", "org/m", "--model-type",
            "llama", "--recent", "128", "--source-note", "From the paper."]  # fmt: skip
    assert main(args) == 0
    masks = LeanKMasks.from_pretrained(tmp_path / "repo")
    assert torch.equal(masks.to_dense(), mask) and masks.recent == 128 and masks.model_type == "llama"
    assert "From the paper." in (tmp_path / "repo" / "README.md").read_text()


def test_convert_refuses_arbitrary_pickles_and_bad_alignment(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"channel_mask": Payload()}))
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "does not unpickle those" in captured.err and "this must never run" not in captured.out
    assert "weights_only=False" not in captured.err, "never advise loading it unsafely"
    assert "torch.save(mask.bool()" in captured.err and "safetensors" in captured.err
    save_file({"channel_mask": aligned_mask().to(torch.uint8)}, tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--align", "32"]) == 2
    assert "not a multiple of the alignment 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def fail(*args, **kwargs):
    raise OSError("No space left on device")


def test_convert_leaves_no_partial_repo(tmp_path, monkeypatch, capsys):
    """A failure while rendering (here the heatmap) writes nothing; over an existing repo, the old one stays whole
    (save_pretrained's own crash safety: test_repo_files)."""
    save_file({"channel_mask": aligned_mask().to(torch.uint8)}, tmp_path / "m.safetensors")
    argv = ["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--align", "16"]
    monkeypatch.setattr("leank_hf.masks.repo_mixin.heatmap_png", fail)
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"], "no repo, no temporary file left"
    monkeypatch.undo()
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr("leank_hf.masks.repo_mixin.heatmap_png", fail)
    assert main([*argv, "--sink", "32"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


ROWS = [
    {"method": "full cache", "keep_ratio": 1.0, "kl": 0.0, "top1": 1.0, "retrieval": 1.0, "full_cache_solved": "2/2"},
    {"method": "learned", "keep_ratio": 0.5, "kl": 0.01, "top1": 0.9, "retrieval": 0.5},
]


@pytest.mark.parametrize("failing", [None, "leank_hf.eval.accuracy_png", "leank_hf.masks.repo_mixin.render_card"])
def test_eval_writes_its_outputs_and_the_record_all_or_nothing(failing, tmp_path, monkeypatch, capsys):
    """A failure while writing (the plot, the record's card) leaves --out empty and --record-in as it was."""
    monkeypatch.setattr("leank_hf.cli.load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr("leank_hf.eval.standard_methods", lambda *args, **kwargs: {})
    monkeypatch.setattr("leank_hf.eval.evaluate", lambda *args, **kwargs: ROWS)
    record = tmp_path / "record"
    LeanKMasks(torch.arange(32).expand(2, 3, 32) < 16).save_pretrained(record)
    before = {p.name: p.read_bytes() for p in record.iterdir()}
    if failing:
        monkeypatch.setattr(failing, fail)
    argv = ["eval", "--out", str(tmp_path / "eval"), "--keep-ratios", "0.5", "--record-in", str(record)]
    assert main(argv) == (2 if failing else 0)
    capsys.readouterr()
    after = {p.name: p.read_bytes() for p in record.iterdir()}
    if failing:
        assert not (tmp_path / "eval").exists() and after == before
    else:
        assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
            "accuracy_vs_keep_ratio.png", "eval.json", "eval.md"
        ]  # fmt: skip
        recorded = LeanKMasks.from_pretrained(record)
        assert [row["method"] for row in recorded.evaluation] == ["full cache", "learned"]
        assert "| learned | 0.5 |" in after["README.md"].decode() and recorded.keep_ratio == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == (["record"] if failing else ["eval", "record"])


def test_push(monkeypatch, tmp_path, capsys):
    LeanKMasks(aligned_mask()).save_pretrained(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = RecordingApi().install(monkeypatch)
    assert main(["push", str(tmp_path), "me/masks", "--private", "--create-pr", "--commit-message", "hi"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/masks/commit/abc"
    assert api.calls[0] == ("create_repo", {"repo_id": "me/masks", "private": True, "exist_ok": True})
    assert api.calls[1][1]["create_pr"] is True and api.calls[1][1]["commit_message"] == "hi"


def test_push_without_a_token_or_the_hub_ends_in_one_error_line(tmp_path):
    """As a user runs it (huggingface_hub reads HF_ENDPOINT and HF_HOME at import): no token anywhere, then a token
    but nothing listening at HF_ENDPOINT. Each ends in `leank-hf push: error:` naming the fix, not a traceback."""
    LeanKMasks(aligned_mask()).save_pretrained(tmp_path / "repo")
    unset = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_ENDPOINT=closed_port_url())
    for extra, fix in (({}, "log in with `hf auth login`, set HF_TOKEN"), ({"HF_TOKEN": "hf_test"}, "HF_ENDPOINT")):
        result = subprocess.run(
            [sys.executable, "-m", "leank_hf.cli", "push", str(tmp_path / "repo"), "me/masks"],
            env={**env, **extra}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("leank-hf push: error: ")]
        assert len(errors) == 1 and fix in errors[0], result.stderr


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


@pytest.mark.parametrize("name", ["inspect", "convert", "push", "generate", "train", "eval"])
def test_help_explains_every_argument_and_shows_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    command = subcommands()[name]
    text = command.format_help()
    options = {block.split()[0].rstrip(","): " ".join(block.split()) for block in re.split(r"\n  (?=-)", text)}
    for action in command._actions:
        assert action.help, f"leank-hf {name}: {action.dest} has no help text"
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert f"(default: {action.default})" in options[action.option_strings[0]], options[
                action.option_strings[0]
            ]


SETTINGS = [("train", MaskLearningArguments), ("eval", EvaluationArguments), ("eval", WindowConfig),
            ("convert", WindowConfig)]  # fmt: skip


def field_default(field: dataclasses.Field) -> object:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@pytest.mark.parametrize(("name", "settings_class"), SETTINGS)
def test_options_take_their_defaults_from_the_settings_dataclasses(name, settings_class, tmp_path):
    """A command's defaults are its dataclasses' field defaults, not ones written again for argparse."""
    required = {"train": ["--out", "run"], "eval": ["--out", "eval"], "convert": [__file__, str(tmp_path)]}
    args = build_parser().parse_args([name, *required[name]])
    for field in dataclasses.fields(settings_class):
        assert getattr(args, field.name) == field_default(field), field.name
    assert settings(settings_class, args) == settings_class()


@pytest.mark.parametrize(("name", "settings_class"), SETTINGS)
def test_help_shows_each_fields_help_text_and_default(name, settings_class, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    text = subcommands()[name].format_help()
    blocks = [" ".join(block.split()) for block in re.split(r"\n  (?=-)", text)]
    for field in dataclasses.fields(settings_class):
        (block,) = [b for b in blocks if b.startswith(f"--{field.name} ")]
        assert f"{field.metadata['help']} (default: {field_default(field)})" in block, block


def test_train_keeps_the_flag_names_users_know():
    argv = ["train", "--out", "run", "--keep-ratio", "0.5", "--align", "32", "--sink", "4", "--recent", "16",
            "--lengths", "100", "200", "--examples", "9", "--stage1-steps", "3", "--stage2-steps", "4", "--lr", "0.1",
            "--stage2-lr", "0.001", "--l1-weight", "0.2", "--batch-size", "2", "--gradient-accumulation-steps", "3",
            "--save-steps", "5", "--logging-steps", "6", "--seed", "7", "--base-model", "org/m", "--mixture",
            "facts"]  # fmt: skip
    assert settings(MaskLearningArguments, build_parser().parse_args(argv)) == MaskLearningArguments(
        keep_ratio=0.5, align=32, sink=4, recent=16, lengths=[100, 200], examples=9, mixture="facts", stage1_steps=3,
        stage2_steps=4,
        learning_rate=0.1, stage2_learning_rate=0.001, l1_weight=0.2, batch_size=2, gradient_accumulation_steps=3,
        save_steps=5, logging_steps=6, seed=7, base_model="org/m",
    )  # fmt: skip


def test_stage2_learning_rate_defaults_to_the_measured_best():
    """0.002, not the paper's 0.01, which made SmolLM2's masks worse than stage 1 alone (BENCHMARKS.md section 4)."""
    assert build_parser().parse_args(["train", "--out", "run"]).stage2_learning_rate == 0.002
    assert MaskLearningArguments().stage2_learning_rate == 0.002
    assert LeanKMaskCallback().stage2_learning_rate == 0.002
    assert "paper: 0.01" in subcommands()["train"].format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"leank-hf {leank_hf.__version__}\n"


def test_errors_exit_2_with_a_message(capsys):
    assert main(["inspect", "./no/such/dir"]) == 2
    assert "no LeanK mask directory" in capsys.readouterr().err


def run(argv: list[str]) -> int:
    """`main`'s exit code, also where argparse refuses an argument (it exits)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--masks", "{tmp}/nonexistent", "--prompt-file", "{prompt}"], "no LeanK mask directory"),
        (["generate", "--masks", "nonexistent", "--prompt-file", "{prompt}"], "nor in the local Hub cache"),
        (["generate", "--masks", "smollm2-135m-instruct", "--prompt-file", "{tmp}/missing.txt"], "no such file"),
        (["generate", "--masks", "smollm2-135m-instruct", "--prompt-file", "{prompt}", "--model", "{tmp}/none"],
         "no model directory"),
        (["train", "--out", "{tmp}/run", "--resume"], "no checkpoint-N folder"),
        (["train", "--out", "{tmp}/run", "--keep-ratio", "1.5"], "must be in (0, 1]"),
        (["train", "--out", "{tmp}/run", "--lengths", "900", "100"], "MIN <= MAX"),
        (["train", "--out", "{tmp}/run", "--stage2-lr", "nan"], "must be > 0"),
        (["train", "--out", "{tmp}/run", "--lengths", "100", "200", "300"], "two token counts"),
        (["train", "--out", "{tmp}/run", "--base-model", "not a/hub id"], "is not a Hub repo id"),
        (["eval", "--out", "{tmp}/eval", "--positions", "4096"], "must be below text_tokens"),
        (["eval", "--out", "{tmp}/eval", "--sink", "-1"], "sink must be an integer from 0"),
        (["convert", "{prompt}", "{tmp}/out", "--block-size", "0"], "block_size must be an integer from 1"),
        (["eval", "--out", "{tmp}/eval", "--masks", "{tmp}/nonexistent"], "no LeanK mask directory"),
        (["eval", "--out", "{tmp}/eval", "--record-in", "smollm2-135m-instruct"], "no such directory"),
        (["eval", "--out", "{tmp}/eval", "--record-in", "{repo}", "--keep-ratios", "0.3"], "add 0.50 to them"),
        (["eval", "--out", "{tmp}/eval", "--suites", "longbench"], "invalid choice: 'longbench'"),
        (["eval", "--out", "{tmp}/eval", "--suites", "ruler", "--ruler-families", "niah"], "invalid choice: 'niah'"),
        (["eval", "--out", "{tmp}/eval", "--suites", "ruler", "--ruler-tokens", "100"],
         "ruler_tokens must be an integer >= 256, got 100"),
        (["eval", "--out", "{tmp}/eval", "--ruler-tasks", "0"], "ruler_tasks must be an integer > 0"),
        (["eval", "--out", "{tmp}/eval", "--suites", "ruler", "--record-in", "{repo}", "--keep-ratios", "0.5"],
         "add standard to --suites"),
        (["train", "--out", "{tmp}/run", "--mixture", "alice"], "invalid choice: 'alice'"),
    ],
)  # fmt: skip
def test_inputs_are_checked_before_a_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    """Bad files, mask repos, model paths and numbers fail at once, with the model loader never called."""
    monkeypatch.setattr(
        "leank_hf.cli.load_model", lambda *args, **kwargs: pytest.fail("loaded a model before checking inputs")
    )
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the Hub lookup stays on this machine
    (tmp_path / "prompt.txt").write_text("Hello")
    half = torch.arange(32).expand(2, 3, 32) < 16
    LeanKMasks(half).save_pretrained(tmp_path / "repo")
    argv = [a.format(tmp=tmp_path, prompt=tmp_path / "prompt.txt", repo=tmp_path / "repo") for a in argv]
    start = time.perf_counter()
    assert run(argv) == 2
    assert time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert f"leank-hf {argv[0]}: error: " in err and message in err, err


def test_convert_refuses_unsupported_model_types_up_front(tmp_path, capsys):
    save_file({"channel_mask": aligned_mask().to(torch.uint8)}, tmp_path / "m.safetensors")
    assert run(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--model-type", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gpt2'" in err and all(f"'{name}'" in err for name in SUPPORTED_MODEL_TYPES)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_generate_with_the_embedded_model(tmp_path, capsys, smollm2):
    (tmp_path / "prompt.txt").write_text("Name three colours of the rainbow.")
    args = ["generate", "--masks", "smollm2-135m-instruct", "--prompt-file", str(tmp_path / "prompt.txt"),
            "--max-new-tokens", "12", "--compare"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[DynamicCache" in out and "[LeanKCache" in out and "LeanK cache:" in out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved like a Hub model."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(smollm2_tokenizer)).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


def test_train_then_resume_then_eval(tiny_model_dir, tmp_path, capsys):
    """`leank-hf train` end to end on a random model (both stages, checkpoints, resume), then `leank-hf eval`."""
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--out", str(out), "--keep-ratio", "0.5", "--sink", "4", "--recent",
              "16", "--lengths", "100", "140", "--examples", "6", "--stage1-steps", "2", "--stage2-steps", "2",
              "--save-steps", "2", "--lr", "0.1", "--base-model", "org/tiny"]  # fmt: skip
    assert main(["train", *common]) == 0
    first = LeanKMasks.from_pretrained(out / "leank_masks")
    assert "50.0% of key channels kept" in capsys.readouterr().out
    assert first.method["name"] == "learned" and first.method["stage2_steps"] == 2 and "data" in first.method
    assert first.base_model == "org/tiny"
    assert (out / "checkpoint-2" / "leank_masks" / "leank_config.json").is_file()

    # A finished run has nothing to resume; a run stopped at the stage switch resumes to the same masks, from its
    # checkpoint: a fresh run would train steps 1-2 again and save checkpoint-2 over the one it had.
    assert main(["train", *common, "--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "leank_masks")
    stopped_state = (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    assert main(["train", *common, "--resume"]) == 0
    assert LeanKMasks.from_pretrained(out / "leank_masks") == first
    assert (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == stopped_state
    assert (out / "checkpoint-4").is_dir()
    capsys.readouterr()

    record = tmp_path / "record"
    first.save_pretrained(record)
    evaluation = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--masks", str(out / "leank_masks"), "--keep-ratios", "0.5",
                 "--sink", "4", "--recent", "16", "--text-tokens", "128", "--positions", "8", "--texts", "1",
                 "--retrieval-tokens", "120", "--retrieval-tasks", "2", "--out", str(evaluation),
                 "--record-in", str(record)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    for method in ("full cache", "learned", "calibration", "think", "random"):
        assert f"| {method} |" in table
    assert (evaluation / "eval.md").read_text().strip() == table.split("\nevaluation recorded")[0].strip()
    assert (evaluation / "accuracy_vs_keep_ratio.png").read_bytes().startswith(b"\x89PNG")
    strict = json.loads((evaluation / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert all(row["retrieval"] is None for row in strict["rows"][1:]), "a random model solves no task: n/a"
    recorded = LeanKMasks.from_pretrained(record)
    assert [row["method"] for row in recorded.evaluation] == ["full cache", "learned", "calibration", "think", "random"]
    assert "| learned | 0.5 |" in (record / "README.md").read_text()


def test_eval_runs_the_ruler_suite_with_quantized_stores(tiny_model_dir, tmp_path, capsys):
    """`leank-hf eval --suites standard ruler` end to end on a random model: both suites' tables, JSON and plots, the
    methods' rows named with the quantization, every family asked for, none solved (a random model), all n/a."""
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--suites", "standard", "ruler", "--keep-ratios", "0.5",
                 "--baselines", "random", "think", "--sink", "4", "--recent", "16", "--kv-bits", "4",
                 "--text-tokens", "128", "--positions", "8", "--texts", "1", "--retrieval-tokens", "120",
                 "--retrieval-tasks", "1", "--ruler-tokens", "300", "--ruler-tasks", "1", "--ruler-families",
                 "niah_multivalue", "common_words", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_keep_ratio.png", "eval.json", "eval.md", "ruler.json", "ruler.md", "ruler_by_family.png",
    ]  # fmt: skip
    ruler_table = (out / "ruler.md").read_text().strip()
    assert printed.strip() == (out / "eval.md").read_text().strip() + "\n\n" + ruler_table
    assert ruler_table.splitlines()[0] == "| tokens | method | keep ratio | niah_multivalue | common_words | all |"
    assert "| 300 | full cache | 1.00 | 0/1 | 0/1 | 0/2 |" in ruler_table
    assert "| 300 | think int4 | 0.50 | n/a | n/a | n/a |" in ruler_table
    rows = json.loads((out / "ruler.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["rows"]
    assert {(r["method"], r["family"]) for r in rows} == {
        (m, f) for m in ("full cache", "random int4", "think int4") for f in ("niah_multivalue", "common_words", "all")
    }
    assert (out / "ruler_by_family.png").read_bytes().startswith(b"\x89PNG")


def test_a_diverged_run_ends_in_one_error_line(tmp_path, monkeypatch, capsys):
    def diverge(*args, **kwargs):
        raise FloatingPointError("LeanK mask learning: the loss became NaN or infinite in optimizer step 3. Lower ...")

    monkeypatch.setattr("leank_hf.cli.load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr("leank_hf.training.recipe.train_masks", diverge)
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("leank-hf train: error: LeanK mask learning: the loss became NaN")


def test_train_records_the_hub_id_a_gguf_file_names(tmp_path, monkeypatch):
    """A local GGUF naming its source repo (general.source.repo_url) gives the masks' base_model; --base-model wins."""
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    writer.add_string("general.source.repo_url", "https://huggingface.co/org/source")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    recorded = []
    monkeypatch.setattr("leank_hf.cli.load_model", lambda *args, **kwargs: (None, None))
    trained = LeanKMasks(aligned_mask())

    def train_masks(model, tokenizer, output_dir, arguments, resume):
        recorded.append(arguments.base_model)
        return trained

    monkeypatch.setattr("leank_hf.training.recipe.train_masks", train_masks)
    common = ["train", "--model", str(tmp_path), "--gguf-file", "model.gguf", "--out", str(tmp_path / "run")]
    for extra in ([], ["--base-model", "org/explicit"]):
        assert main([*common, *extra]) == 0
    assert recorded == ["org/source", "org/explicit"]


def test_train_on_a_model_folder_records_no_path_as_base_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(out), "--keep-ratio", "0.5", "--sink", "4",
                 "--recent", "16", "--lengths", "100", "140", "--examples", "2", "--stage1-steps", "1",
                 "--stage2-steps", "1", "--save-steps", "2"]) == 0  # fmt: skip
    assert LeanKMasks.from_pretrained(out / "leank_masks").base_model is None
    card = (out / "leank_masks" / "README.md").read_text()
    assert str(tiny_model_dir) not in card and "huggingface.co//" not in card


def test_train_errors_are_reported(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--resume"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_inspect_estimates_quantized_middles(capsys):
    """The paper's Llama-3.1-8B mask at 32K tokens: int8 and int4 middles (codes, fp16 scales and zeros per block of
    64 tokens per key channel, per 64 value channels per token) against a bf16 DynamicCache."""
    saved = {}
    for bits in (None, 8, 4):
        args = ["inspect", "llama-3.1-8b-instruct", "--context", "32768"]
        assert main(args + ([] if bits is None else ["--kv-bits", str(bits)])) == 0
        out = capsys.readouterr().out
        saved[bits] = float(re.search(r"KV ([\d.]+)% saved", out).group(1))
        assert (bits is None) != (f"middle tokens in {bits} bits" in out)
    assert saved[None] == 43.1
    assert saved[8] == 69.3 and saved[4] == 83.3  # 0.307x and 0.167x the DynamicCache's bytes


@pytest.mark.parametrize(
    ("option", "message"),
    [("3", "invalid choice: 3 (choose from 4, 8)"), ("4 --q-group-size 48", "power of two"),
     ("4 --q-group-size 128", "q_group_size=128 does not divide this model's head_dim 64")],
)  # fmt: skip
def test_bad_quantization_options_end_in_one_error_line(capsys, option, message):
    with pytest.raises(SystemExit) as exit_code:
        code = main(["inspect", "smollm2-135m-instruct", "--kv-bits", *option.split()])
        raise SystemExit(code)
    assert exit_code.value.code == 2
    assert message in capsys.readouterr().err
