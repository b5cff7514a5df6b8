"""`leank-hf`: inspect, convert and push mask repos, generate with a LeanK cache, learn and evaluate masks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from transformers import HfArgumentParser

from . import __version__
from .architectures import SUPPORTED_MODEL_TYPES
from .compat import cache_kwargs
from .embedded import EMBEDDED_MODEL, embedded_model_path, gguf_source_repo, load_model
from .eval import BASELINES, EvaluationArguments
from .kv_quantization import KVQuantization
from .masks.card import describe_method
from .masks.hub import as_hub_id
from .masks.leank_masks import LeanKMasks
from .training.recipe import MaskLearningArguments
from .windows import WindowConfig

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
SUITES = ("standard", "ruler")  # what `leank-hf eval --suites` can measure
Settings = TypeVar("Settings")


def build_parser() -> argparse.ArgumentParser:
    """The `leank-hf` parser: every option has a help text, and `--help` shows its default."""
    parser = argparse.ArgumentParser(
        prog="leank-hf", description="LeanK K-cache channel masks for transformers", formatter_class=HELP_FORMAT
    )
    parser.add_argument("--version", action="version", version=f"leank-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="`leank-hf COMMAND --help` shows its options")  # fmt: skip

    def command(name: str, help: str, *dataclass_types: type) -> argparse.ArgumentParser:
        """A subcommand. `HfArgumentParser` makes the options of `dataclass_types` from their fields, so their defaults
        and help texts are written once, there; `settings` turns the parsed options back into those dataclasses."""
        parents = [HfArgumentParser(dataclass_types, add_help=False)] if dataclass_types else []
        return commands.add_parser(name, help=help, description=help, formatter_class=HELP_FORMAT, parents=parents)

    inspect = command("inspect", "summarise a mask repo (local dir, shipped name, or Hub id)", KVQuantization)
    inspect.add_argument("repo", help="mask repo: directory, shipped short name, or Hub repo id")
    inspect.add_argument("--context", type=positive_int, default=32768,
                         help="tokens per sequence for the memory estimate")  # fmt: skip
    inspect.add_argument("--batch", type=positive_int, default=1, help="sequences for the memory estimate")
    inspect.add_argument("--bytes-per-value", type=positive_int, default=2, help="2 for bf16/fp16 caches, 4 for fp32")
    inspect.add_argument("--plot", type=Path, help="also write the kept-channel heatmap to this PNG")
    inspect.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub mask repo")
    inspect.set_defaults(run=_inspect)

    convert = command("convert", "turn a [layers, kv_heads, head_dim] mask file into a mask repo", WindowConfig)
    convert.add_argument("source", type=readable_file,
                         help=".safetensors (tensor 'channel_mask') or .pth of the paper's layout")  # fmt: skip
    convert.add_argument("output", type=Path, help="directory to write the mask repo into (replacing one there)")
    convert.add_argument("--align", type=positive_int, default=32,
                         help="per-head kept counts are multiples of this (the paper's masks: 32)")  # fmt: skip
    convert.add_argument("--base-model", type=hub_id, help="Hub id of the model the masks are for")
    convert.add_argument("--model-type", choices=SUPPORTED_MODEL_TYPES,
                         help="transformers model_type of that model (checked on load)")  # fmt: skip
    convert.add_argument("--source-note", help="provenance and licence text for the model card")
    convert.set_defaults(run=_convert)

    push = command("push", "upload a mask repo directory to the Hub (needs a token with write access)")
    push.add_argument("directory", type=directory, help="the mask repo folder to upload")
    push.add_argument("repo_id", type=hub_id, help="Hub repo to push to, e.g. you/your-masks (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one is unchanged)")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="commit message (unset: one naming the keep ratio)")
    push.set_defaults(run=_push)

    generate = command("generate", "generate with a LeanK cache (and the full cache to compare)", KVQuantization)
    _add_model_arguments(generate)
    generate.add_argument("--masks", required=True, help="mask repo: directory, shipped short name, or Hub repo id")
    generate.add_argument("--prompt-file", type=readable_file, required=True,
                          help="text file; sent through the chat template")  # fmt: skip
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (greedy)")
    generate.add_argument("--compare", action="store_true", help="also generate with DynamicCache")
    generate.set_defaults(run=_generate)

    train = command("train", "learn masks (two-stage distillation, transformers.Trainer)", MaskLearningArguments)
    _add_model_arguments(train)
    train.add_argument("--out", type=Path, required=True, help="output dir: checkpoints and the final leank_masks/")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.set_defaults(run=_train)

    evaluate = command("eval", "compare masks with the full cache and with baseline masks", EvaluationArguments,
                       WindowConfig, KVQuantization)  # fmt: skip
    _add_model_arguments(evaluate)
    evaluate.add_argument("--masks", nargs="*", default=[], help="learned mask repos (each at its own keep ratio)")
    evaluate.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                          help="baselines to compare with (their windows: --sink, --recent, --block-size)")  # fmt: skip
    evaluate.add_argument("--suites", nargs="+", default=["standard"], choices=SUITES,
                          help="what to measure: standard (KL, top-1 on held-out prose, retrieval in the training "
                          "format: eval.json, eval.md, accuracy_vs_keep_ratio.png) and/or ruler (the RULER-style "
                          "suite, --ruler-*: ruler.json, ruler.md, ruler_by_family.png)")  # fmt: skip
    evaluate.add_argument("--out", type=Path, required=True, help="dir for the suites' tables, JSON and plots")
    evaluate.add_argument("--record-in", type=directory,
                          help="also store the standard suite's rows at this mask repo's keep ratio in its config and "
                          "card")  # fmt: skip
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, FloatingPointError) as err:  # the library's errors say what is wrong and what to do
        print(f"leank-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> None:
    from .memory import estimate_memory

    masks = LeanKMasks.from_pretrained(args.repo, revision=args.revision)
    counts = masks.kept_counts
    print(f"mask repo: {args.repo}\nbase model: {masks.base_model or 'unknown'}")
    print(f"layers {masks.num_layers}, KV heads {masks.num_kv_heads}, head_dim {masks.head_dim}, align {masks.align}")
    print(
        f"sink {masks.sink}, recent {masks.recent}, block {masks.block_size}; made by: {describe_method(masks.method)}"
    )
    print(f"key channels kept: {masks.keep_ratio:.1%}; fully pruned KV heads: {int((counts == 0).sum())}\n")
    quantization = settings(KVQuantization, args)
    if quantization.kv_bits is not None:
        quantization.group_size(masks.head_dim)  # refuses a group that does not divide head_dim
        print(f"middle tokens in {quantization.kv_bits} bits (estimate counts codes, scales and zeros)")
    report = estimate_memory(
        masks.channel_mask, masks.pruned_layers, masks.sink, masks.recent, args.context, args.batch,
        args.bytes_per_value, quantization, masks.block_size,
    )  # fmt: skip
    print("| layer | kept | fully pruned heads | K MiB | V MiB | DynamicCache MiB |\n|---|---|---|---|---|---|")
    mib = 2**20
    for layer in report.layers:
        kept = masks.channel_mask[layer.layer].float().mean()
        pruned = int((counts[layer.layer] == 0).sum())
        print(f"| {layer.layer} | {kept:.1%} | {pruned} | {layer.key_bytes / mib:.1f} | {layer.value_bytes / mib:.1f}"
              f" | {layer.dense_bytes / mib:.1f} |")  # fmt: skip
    half = report.dense_bytes / 2
    print(
        f"\nat {args.context} tokens x batch {args.batch}: K {1 - report.key_bytes / half:.1%} saved, "
        f"V {1 - report.value_bytes / half:.1%} saved, KV {report.saved_fraction:.1%} saved "
        f"({report.total_bytes / mib:.1f} of {report.dense_bytes / mib:.1f} MiB)"
    )
    if args.plot:
        from .masks.card import plot_masks

        plot_masks(masks, args.plot)
        print(f"heatmap written to {args.plot}")


def load_mask_file(path: Path) -> torch.Tensor:
    """The `[layers, kv_heads, head_dim]` mask of a reference file.

    `.pth` files are read with `torch.load(weights_only=True)`, whose unpickler accepts only tensors and plain
    containers (it refuses arbitrary objects); everything else leank-hf reads is safetensors or JSON.
    """
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Not chained: torch's message advises weights_only=False, i.e. running whatever the file holds.
            raise ValueError(
                f"{path} holds objects other than tensors, and leank-hf does not unpickle those (unpickling can run "
                "code). Where you trust the file, save just its mask tensor, e.g. torch.save(mask.bool(), "
                "'mask.pth'), or as safetensors with a 'channel_mask' tensor, and convert that"
            ) from None
        except (RuntimeError, EOFError, KeyError) as err:
            raise ValueError(
                f"{path} is not a readable torch.save file ({type(err).__name__}: {err}); re-save it"
            ) from err
    else:
        from .masks.io import read_safetensors

        data = read_safetensors(path)
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        data = data.get("channel_mask", tensors[0] if len(tensors) == 1 else None)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path} holds no single mask tensor (expected a tensor or a dict with 'channel_mask')")
    return data


def _convert(args: argparse.Namespace) -> None:
    windows = settings(WindowConfig, args)
    mask = load_mask_file(args.source)
    method = {"name": "converted", "from": args.source.name}
    if args.source_note:
        method["source"] = args.source_note
    masks = LeanKMasks.from_dense(
        mask, align=args.align, base_model=args.base_model, model_type=args.model_type, method=method,
        **dataclasses.asdict(windows),
    )  # fmt: skip
    masks.save_pretrained(args.output, overwrite_card=True)  # a card of other masks would describe the wrong ones
    print(f"wrote {args.output}: {masks.keep_ratio:.1%} of key channels kept")


def _push(args: argparse.Namespace) -> None:
    masks = LeanKMasks.from_pretrained(args.directory)
    url = masks.push_to_hub(
        args.repo_id, private=args.private or None, revision=args.revision, create_pr=args.create_pr,
        commit_message=args.commit_message,
    )  # fmt: skip
    print(url)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL, help=f"model dir or Hub id ('{EMBEDDED_MODEL}': embedded)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model (ignored for the embedded model)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the model is loaded in")  # fmt: skip


def model_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file) named by --model/--gguf-file, checked as far as can be without loading it."""
    if args.model == EMBEDDED_MODEL:
        return embedded_model_path()
    folder = Path(args.model)
    if folder.is_dir():
        if args.gguf_file and not (folder / args.gguf_file).is_file():
            raise FileNotFoundError(f"--gguf-file: no {args.gguf_file} in {folder}")
        return args.model, args.gguf_file
    if as_hub_id(args.model) is None:
        raise FileNotFoundError(f"--model: no model directory at {args.model} (and it is no Hub id)")
    return args.model, args.gguf_file


def _generate(args: argparse.Namespace) -> None:
    import time

    from transformers import DynamicCache

    from .cache.leank_cache import LeanKCache

    quantization = settings(KVQuantization, args)
    source = model_source(args)
    masks = LeanKMasks.from_pretrained(args.masks)
    messages = [{"role": "user", "content": args.prompt_file.read_text(encoding="utf-8")}]
    model, tokenizer = load_model(*source, dtype=args.dtype)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = inputs.to(model.device)
    caches = {"LeanKCache": LeanKCache(masks, model, **dataclasses.asdict(quantization))}
    if args.compare:
        caches = {"DynamicCache": DynamicCache(config=model.config), **caches}
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens")
    for name, cache in caches.items():
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        print(f"\n[{name}, {time.perf_counter() - start:.1f} s]\n{text}")
    print(f"\n{caches['LeanKCache'].memory_report()}")


def settings(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The `cls` dataclass from the options `HfArgumentParser` made of its fields (see `build_parser`). Its checks run
    here, inside `main`, so a bad value ends in a `leank-hf COMMAND: error:` line, before any model is loaded."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _train(args: argparse.Namespace) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    from .training.recipe import train_masks

    arguments = settings(MaskLearningArguments, args)
    source = model_source(args)
    if args.resume and not (args.out.is_dir() and get_last_checkpoint(str(args.out))):
        raise ValueError(f"--resume: no checkpoint-N folder in {args.out} to resume from; drop --resume to start anew")
    folder, gguf_file = source
    local_gguf = Path(folder, gguf_file) if gguf_file and Path(folder).is_dir() else None
    if arguments.base_model is None and local_gguf:
        arguments = dataclasses.replace(arguments, base_model=gguf_source_repo(local_gguf))
    model, tokenizer = load_model(*source, dtype=args.dtype)
    masks = train_masks(model, tokenizer, args.out, arguments, resume=args.resume)
    print(f"masks written to {args.out / 'leank_masks'}: {masks.keep_ratio:.1%} of key channels kept, "
          f"{int((masks.kept_counts == 0).sum())} KV heads fully pruned")  # fmt: skip


def _evaluate(args: argparse.Namespace) -> None:
    from .eval import (
        accuracy_png,
        evaluate,
        evaluate_ruler,
        format_ruler_table,
        format_table,
        ruler_png,
        standard_methods,
    )
    from .masks.io import atomic_write_bytes, json_bytes

    measured, windows = settings(EvaluationArguments, args), settings(WindowConfig, args)
    quantization = settings(KVQuantization, args)
    source = model_source(args)
    learned = [LeanKMasks.from_pretrained(repo) for repo in args.masks]
    record = LeanKMasks.from_pretrained(args.record_in) if args.record_in else None
    ratios = measured.keep_ratios
    if record is not None and "standard" not in args.suites:
        raise ValueError("--record-in stores the standard suite's rows; add standard to --suites or drop --record-in")
    if record is not None and round(record.keep_ratio, 2) not in {round(r, 2) for r in ratios}:
        raise ValueError(
            f"--record-in {args.record_in} keeps {record.keep_ratio:.2f} of the key channels, which --keep-ratios "
            f"{' '.join(map(str, ratios))} does not evaluate; add {record.keep_ratio:.2f} to them"
        )
    model, tokenizer = load_model(*source, dtype=args.dtype)
    methods = standard_methods(model, tokenizer, learned, args.baselines, windows=windows)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    # Everything is rendered before the first write, and the record (which renders its own files first) is saved
    # before the outputs: a failure leaves --out and --record-in as they were.
    outputs, tables, rows = {}, [], []
    if "standard" in args.suites:
        rows = evaluate(model, tokenizer, methods, measured, quantization)
        tables.append(format_table(rows))
        outputs |= {
            "eval.json": json_bytes({"rows": rows, "arguments": arguments}, "eval.json"),
            "eval.md": (tables[-1] + "\n").encode("utf-8"),
            "accuracy_vs_keep_ratio.png": accuracy_png(rows),
        }
    if "ruler" in args.suites:
        ruler_rows = evaluate_ruler(model, tokenizer, methods, measured, quantization)
        tables.append(format_ruler_table(ruler_rows))
        outputs |= {
            "ruler.json": json_bytes({"rows": ruler_rows, "arguments": arguments}, "ruler.json"),
            "ruler.md": (tables[-1] + "\n").encode("utf-8"),
            "ruler_by_family.png": ruler_png(ruler_rows),
        }
    if record is not None:
        kept = [r for r in rows if r["keep_ratio"] in (1.0, round(record.keep_ratio, 2))]
        record.replace(evaluation=kept).save_pretrained(args.record_in, overwrite_card=True)
    for name, data in outputs.items():
        atomic_write_bytes(args.out / name, data)
    print("\n\n".join(tables))
    if record is not None:
        print(f"evaluation recorded in {args.record_in}")


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def readable_file(text: str) -> Path:
    """An argparse type: a file that exists and can be read."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be read (permissions)")
    return path


def directory(text: str) -> Path:
    """An argparse type: an existing directory."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return Path(text)


def hub_id(text: str) -> str:
    """An argparse type: a well-formed Hub repo id (`org/name` or `name`)."""
    if as_hub_id(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id (org/name or name)")
    return text


if __name__ == "__main__":
    sys.exit(main())
