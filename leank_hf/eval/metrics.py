"""What an evaluation measures, one function each: held-out prose windows, decoded logits on a cache, next-token
agreement with the full cache, and whether a greedy answer holds the right string."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..compat import cache_kwargs
from .prose import prose_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def heldout_windows(tokenizer: PreTrainedTokenizerBase, tokens: int, count: int) -> list[torch.Tensor]:
    """`count` windows `[1, tokens]` of the held-out chapters, spread evenly over them (overlapping if needed)."""
    ids = tokenizer(prose_text("heldout"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < tokens:
        raise ValueError(f"the held-out text has {ids.shape[1]} tokens, fewer than the {tokens} asked for")
    last = ids.shape[1] - tokens
    starts = [round(i * last / max(1, count - 1)) for i in range(count)]
    return [ids[:, s : s + tokens] for s in starts]


def decoded_logits(model: PreTrainedModel, input_ids: torch.Tensor, cache, positions: int) -> torch.Tensor:
    """`[positions, vocab]` fp32 logits at the last `positions` tokens of `input_ids` `[1, T]`: the tokens before
    them are prefilled exactly, then each of them is fed one at a time on `cache`."""
    device = model.device
    input_ids = input_ids.to(device)
    split = input_ids.shape[1] - positions
    with torch.no_grad():
        model(input_ids=input_ids[:, :split], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        steps = [
            model(input_ids=input_ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1].float()
            for t in range(split, input_ids.shape[1])
        ]
    return torch.stack(steps)


def next_token_agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference ‖ logits), share of positions with the same top-1 token) over `[positions, vocab]`."""
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean()
    return float(kl), float(top1)


def answers_correctly(model: PreTrainedModel, tokenizer, prompt_ids: list[int], answer: str, cache) -> bool:
    """Greedy-decode the answer with `cache` and check that it contains `answer` (small models often restate the
    question first, hence the room beyond the answer's length)."""
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), do_sample=False,
                             max_new_tokens=answer_tokens + 24, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return answer in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
