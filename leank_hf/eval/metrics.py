"""What an evaluation measures, one function each: held-out prose windows, decoded logits on a cache, next-token
agreement with the full cache, and whether a greedy answer holds the right strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

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
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return answer in generated_text(model, tokenizer, prompt_ids, cache, answer_tokens + 24)


def solves_task(model: PreTrainedModel, tokenizer, prompt_ids: list[int], answers: Sequence[str], cache) -> bool:
    """Greedy-decode a reply with `cache` and check that it holds every one of `answers`, ignoring case
    (`string_match_all` is 1). There is room for the answers, comma-separated, and 24 tokens more per answer (small
    models restate the question, or explain each answer before the next); decoding stops once all have appeared,
    which changes no verdict."""
    answer_tokens = len(tokenizer(", ".join(answers), add_special_tokens=False)["input_ids"])
    seen = _AllSeen(tokenizer, len(prompt_ids), answers)
    reply = generated_text(model, tokenizer, prompt_ids, cache, answer_tokens + 24 * len(answers), [seen])
    return string_match_all(reply, answers) == 1.0


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's and kvpress's score: the share of `references` found in `prediction`, ignoring case."""
    text = prediction.lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def generated_text(
    model: PreTrainedModel, tokenizer, prompt_ids: list[int], cache, max_new_tokens: int, stopping_criteria=None
) -> str:
    """The greedy reply to `prompt_ids` on `cache`, at most `max_new_tokens` tokens: only what is generated after the
    prompt (which holds the answers) counts."""
    ids = torch.tensor([prompt_ids], device=model.device)
    stop = {"stopping_criteria": StoppingCriteriaList(stopping_criteria)} if stopping_criteria else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **stop)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class _AllSeen(StoppingCriteria):
    """Stops greedy decoding once the reply (after `prompt_length` tokens) holds every one of `answers`."""

    def __init__(self, tokenizer, prompt_length: int, answers: Sequence[str]) -> None:
        self.tokenizer, self.prompt_length, self.answers = tokenizer, prompt_length, answers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [
            string_match_all(self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=True), self.answers)
            == 1.0
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
