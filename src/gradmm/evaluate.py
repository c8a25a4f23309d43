"""Verbalizer classification with a causal LM: scores, accuracy, zero- and k-shot prompts.

An example is classified by the label word with the highest log-probability as the next token
after ``template(text)`` (label words are one token each, see :mod:`gradmm.tasks`), exactly the
quantity that fine-tuning optimises and that generation matches the gradient of. For k-shot
in-context evaluation the prompt starts with ``k`` demonstrations per class, each
``template(text) + label word + "\\n"``, drawn from a public split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradmm.models import LoadedModel, right_padded
from gradmm.tasks import Examples, PromptTokens, encode_text


def label_log_probs(
    lm: LoadedModel,
    prompt: PromptTokens,
    texts: list[str],
    prefix: list[int] | None = None,
    batch_size: int = 32,
) -> Tensor:
    """(N, C) log p(label word of class c | prefix + template(text)); differentiable.

    Sequences are right-padded and masked, and the score is read at each one's last real position.
    """
    prefix = prefix or []
    seqs = [prefix + prompt.encode(lm.tokenizer, t) for t in texts]
    labels = torch.tensor(prompt.label_ids)
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask, last = right_padded(seqs[start : start + batch_size])
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[torch.arange(len(last)), last], dim=-1)
        out.append(logp[:, labels])
    return torch.cat(out)


def demonstrations(
    lm: LoadedModel, prompt: PromptTokens, pool: Examples, k: int, seed: int
) -> list[int]:
    """Token ids of ``k`` demonstrations per class from ``pool`` (seeded), classes interleaved."""
    if k == 0:
        return []
    rng = np.random.default_rng(seed)
    labels = np.asarray(pool.labels)
    per_class = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c in
                 range(len(prompt.label_ids))]  # fmt: skip
    newline = encode_text(lm.tokenizer, "\n")
    ids: list[int] = []
    for j in range(k):
        for c, picks in enumerate(per_class):
            ids += prompt.encode(lm.tokenizer, pool.texts[picks[j]]) + [prompt.label_ids[c]]
            ids += newline
    return ids


@torch.no_grad()
def accuracy(
    lm: LoadedModel,
    prompt: PromptTokens,
    examples: Examples,
    label_names: tuple[str, ...],
    prefix: list[int] | None = None,
) -> dict:
    """Accuracy and per-class accuracy of the verbalizer classifier on ``examples``."""
    pred = label_log_probs(lm, prompt, examples.texts, prefix).argmax(1)
    gold = torch.tensor(examples.labels)
    per_class = {
        name: float((pred[gold == c] == c).float().mean()) if (gold == c).any() else None
        for c, name in enumerate(label_names)
    }
    return {
        "accuracy": float((pred == gold).float().mean()),
        "per_class_accuracy": per_class,
        "n": len(gold),
    }
