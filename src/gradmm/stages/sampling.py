"""The LM's own class-conditional text: the ``lm_prompted`` baseline's examples and the candidate
batches of ``generate --init lm``.

Both prompt the model with the task's public demonstrations of one class (never private data),
so that it continues with a new example of that class. Nothing here reads the private pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradmm.core.admm import Problems
from gradmm.core.lm import LoadedModel
from gradmm.core.tokens import PromptTokens
from gradmm.data.tasks import Task


def class_prompt(task: Task, prompt: PromptTokens, tokenizer, c: int, purpose: str) -> list[int]:
    """Ids of the task's public demonstrations of class ``c`` (each prompt, label word and
    newline): the context that makes the LM write another example of ``c``."""
    demos = [t for t, y in task.require_demonstrations(purpose) if y == c]
    return prompt.demonstrations(tokenizer, [(text, c) for text in demos])


def class_context(task: Task, prompt: PromptTokens, tokenizer, c: int, purpose: str) -> list[int]:
    """:func:`class_prompt` and the template's head: the context in which the LM writes the
    text of a new example of class ``c`` (``--init lm``, ``--projection-context
    demonstrations``)."""
    return class_prompt(task, prompt, tokenizer, c, purpose) + prompt.head


@torch.no_grad()
def lm_prompted_examples(
    lm: LoadedModel, task: Task, prompt: PromptTokens, per_class: int, seed: int
) -> list[dict]:
    """``per_class`` texts per class: a continuation of :func:`class_prompt` cut at its first
    newline and at the template's tail (top-k 50, temperature 0.9, at most 40 tokens)."""
    tail = lm.tokenizer.decode(prompt.tail).strip()
    torch.manual_seed(seed)
    rows = []
    for c in range(task.num_classes):
        ids = class_prompt(task, prompt, lm.tokenizer, c, "the lm_prompted baseline")
        got, attempts = [], 0
        while len(got) < per_class and attempts < 20:
            attempts += 1
            batch = torch.tensor([ids], device=lm.device).repeat(per_class, 1)
            gen = lm.model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=40,
                do_sample=True,
                top_k=50,
                temperature=0.9,
                pad_token_id=lm.tokenizer.eos_token_id,
            )
            for seq in gen[:, len(ids) :]:
                text = lm.tokenizer.decode(seq, skip_special_tokens=True).split("\n")[0]
                text = text.split(tail)[0].strip() if tail else text.strip()
                if text and len(got) < per_class:
                    got.append(text)
        rows += [{"text": t, "label": c, "label_name": task.label_names[c]} for t in got]
    return rows


class AllowedTokensOnly:
    """A ``generate`` logits processor: tokens the projection may not choose get −∞."""

    def __init__(self, allowed: Tensor):
        self.allowed = allowed  # (V,) bool over the embedding rows

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        allowed = self.allowed[: scores.shape[-1]].to(scores.device)
        if len(allowed) < scores.shape[-1]:  # output rows beyond the embedding's: never allowed
            pad = torch.zeros(scores.shape[-1] - len(allowed), dtype=torch.bool)
            allowed = torch.cat([allowed, pad.to(scores.device)])
        return scores.masked_fill(~allowed, float("-inf"))


def text_init_sampler(
    lm: LoadedModel, task: Task, prompt: PromptTokens, allowed: Tensor, batch: int, length: int
) -> Callable[[Problems, int], Tensor]:
    """``init: lm``'s sampler: ``(problems, K) -> (P, K, B, G)`` token ids, K·B continuations of
    exactly ``length`` allowed tokens after :func:`class_prompt` and the template's head, per
    problem from its own seed (so a problem's start does not depend on what runs beside it)."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([AllowedTokensOnly(allowed)])
    contexts = [
        class_context(task, prompt, lm.tokenizer, c, "init: lm") for c in range(task.num_classes)
    ]

    @torch.no_grad()
    def sample(problems: Problems, count: int) -> Tensor:
        out = torch.empty(len(problems), count, batch, length, dtype=torch.long)
        for p in range(len(problems)):
            ids = contexts[int(problems.classes[p])]
            feed = torch.tensor([ids], device=lm.device).repeat(count * batch, 1)
            devices = [lm.device] if lm.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(problems.seeds[p])
                gen = lm.model.generate(
                    feed,
                    attention_mask=torch.ones_like(feed),
                    min_new_tokens=length,
                    max_new_tokens=length,
                    do_sample=True,
                    top_k=50,
                    temperature=0.9,
                    logits_processor=processors,
                    pad_token_id=lm.tokenizer.eos_token_id,
                )
            out[p] = gen[:, len(ids) :].reshape(count, batch, length).cpu()
        return out

    return sample
