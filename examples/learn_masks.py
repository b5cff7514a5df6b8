"""Learn LeanK masks for the embedded SmolLM2-135M-Instruct with a stock `transformers.Trainer`.

Run: python examples/learn_masks.py --out runs/smollm2 [--stage1-steps 60 --stage2-steps 20 --max-tokens 2048]

This is the Python API that `leank-hf train` wraps. The defaults are sized for a CPU (a 2K-token step takes a few
seconds there); the shipped mask was trained with `hub_cards/learn_smollm2.sh` on a GPU (2000 + 200 steps, 1K-8K
tokens). Add `--resume` to continue an interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import argparse

from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from leank_hf.embedded import load_embedded_model
from leank_hf.training import LeanKMaskCallback, make_retrieval_dataset, prepare_for_mask_learning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output dir: checkpoints and the final mask repo")
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=2048, help="longest training prompt")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_embedded_model()

    student = prepare_for_mask_learning(model, sink=64, recent=256)  # frozen model + trainable channel scales
    data = make_retrieval_dataset(tokenizer, lengths=(args.max_tokens // 2, args.max_tokens), n=500)
    trainer = Trainer(
        model=student,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.stage1_steps + args.stage2_steps,
            learning_rate=0.02,
            lr_scheduler_type="constant",
            per_device_train_batch_size=1,
            logging_steps=5,
            save_steps=20,
            report_to="none",
        ),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=[
            LeanKMaskCallback(
                keep_ratio=args.keep_ratio, align=16, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps
            )
        ],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    masks = student.export_masks()  # a LeanKMasks: save_pretrained / push_to_hub it
    print(f"{masks.keep_ratio:.1%} of key channels kept; mask repo in {args.out}/leank_masks")


if __name__ == "__main__":
    main()
