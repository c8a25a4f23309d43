"""Verbalizer classification with a causal LM: scores, accuracy, zero- and k-shot prompts.

An example is classified by the label word with the highest length-normalised log-probability
(the mean over its tokens, teacher-forced) after ``template(text)``: exactly the quantity that
fine-tuning optimises and that generation matches the gradient of. For k-shot in-context
evaluation the prompt starts with ``k`` demonstrations per class, each
``template(text) + label word + "\\n"``, drawn from a public split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradmm.core.lm import LoadedModel, final_hidden, prefix_cache, right_padded
from gradmm.core.settings import Runtime
from gradmm.core.tokens import PromptTokens, encode_text
from gradmm.data.tasks import DEV_SEED, Examples, dev_indices, examples_from_rows, load_examples
from gradmm.errors import UserError
from gradmm.files import read_jsonl_numbered
from gradmm.stages.configs import EvaluateConfig


def label_log_probs(
    lm: LoadedModel,
    prompt: PromptTokens,
    texts: list[str],
    prefix: list[int] | None = None,
    batch_size: int = 32,
) -> Tensor:
    """(N, C) log-probability of the label word of class c after ``prefix + template(text)``:
    its tokens' log-probabilities (teacher-forced), summed or averaged as ``prompt.label_score``
    says; differentiable.

    Label words that share all but their last token share one forward pass (all one-token words
    share the plain prompt's). Sequences are right-padded and masked; the output layer runs at
    the scored positions only (logits at every position would cost more than the decoder for a
    large vocabulary). The ``prefix`` (few-shot demonstrations: the same for every text) runs
    once, and every batch continues from its cached keys and values (no gradient flows into
    them; a model without such a cache reads the prefix with every text).
    """
    cache = prefix_cache(lm.model, prefix) if prefix else None
    seqs = [
        ([] if cache is not None else prefix or []) + prompt.encode(lm.tokenizer, t) for t in texts
    ]
    groups: dict[tuple[int, ...], list[int]] = {}  # label feed -> classes
    for c, word in enumerate(prompt.label_ids):
        groups.setdefault(tuple(word[:-1]), []).append(c)
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        rows = torch.arange(len(batch), device=lm.device)[:, None]
        scores: dict[int, Tensor] = {}
        for feed, classes in groups.items():
            ids, mask, last = right_padded([s + list(feed) for s in batch], lm.device)
            hidden = final_hidden(lm.model, input_ids=ids, attention_mask=mask, prefix=cache)
            pos = last[:, None] - len(feed) + torch.arange(len(feed) + 1, device=lm.device)
            logp = torch.log_softmax(lm.output.logits(hidden[rows, pos]), dim=-1)  # (n, K, V)
            for c in classes:
                word = torch.tensor(prompt.label_ids[c], device=lm.device)
                token_logp = logp[:, torch.arange(len(word)), word]  # (n, K_c)
                mean = prompt.label_score == "mean"
                scores[c] = token_logp.mean(1) if mean else token_logp.sum(1)
        out.append(torch.stack([scores[c] for c in range(len(prompt.label_ids))], 1))
    return torch.cat(out)


def demonstrations(
    lm: LoadedModel, prompt: PromptTokens, pool: Examples, k: int, seed: int
) -> list[int]:
    """Token ids of ``k`` demonstrations per class from ``pool`` (seeded), classes interleaved."""
    if k == 0:
        return []
    rng = np.random.default_rng(seed)
    labels = np.asarray(pool.labels)
    for c in range(len(prompt.label_ids)):
        if (labels == c).sum() < k:
            raise UserError(
                f"{k} demonstrations per class asked for, but {pool.source} has "
                f"{(labels == c).sum()} of class {c}"
            )
    per_class = [
        rng.choice(np.flatnonzero(labels == c), k, replace=False)
        for c in range(len(prompt.label_ids))
    ]
    picks = [(pool.texts[per_class[c][j]], c) for j in range(k) for c in range(len(per_class))]
    return prompt.demonstrations(lm.tokenizer, picks)


@torch.no_grad()
def accuracy(
    lm: LoadedModel,
    prompt: PromptTokens,
    examples: Examples,
    label_names: tuple[str, ...],
    prefix: list[int] | None = None,
) -> dict:
    """Accuracy and per-class accuracy of the verbalizer classifier on ``examples``."""
    pred = label_log_probs(lm, prompt, examples.texts, prefix).argmax(1).cpu()
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


def eval_sets(
    task, data_dir, max_test: int | None, seed: int, dev_file: str | None = None
) -> tuple[Examples, Examples]:
    """The dev set (``dev_file``, else the dev slice of the private split) and the test split
    (optionally subsampled)."""
    return dev_set(task, data_dir, dev_file), test_set(task, data_dir, max_test, seed)


def dev_set(task, data_dir, dev_file: str | None = None, max_size: int | None = None) -> Examples:
    """``dev_file`` (public) if given, else the dev slice of the private split (private); at most
    ``max_size`` of its examples, a fixed sample that no user seed moves."""
    if dev_file is not None:
        dev = examples_from_rows(task, read_jsonl_numbered(Path(dev_file)), dev_file)
    else:
        private = load_examples(task, task.private_split, data_dir)
        dev_ix = dev_indices(private, task.dev_size)
        dev = Examples(
            [private.texts[i] for i in dev_ix],
            [private.labels[i] for i in dev_ix],
            f"{private.source} (dev slice)",
        )
    if max_size is not None and max_size < len(dev.texts):
        ix = sorted(np.random.default_rng(DEV_SEED).choice(len(dev.texts), max_size, replace=False))
        dev = Examples([dev.texts[i] for i in ix], [dev.labels[i] for i in ix], dev.source)
    return dev


def test_set(task, data_dir, max_test: int | None, seed: int) -> Examples:
    """The test split, optionally a seeded subsample of ``max_test`` examples."""
    if task.test_split == task.private_split:
        raise UserError(f"task {task.name!r}: the test split must differ from the private split")
    test = load_examples(task, task.test_split, data_dir)
    if max_test is not None and max_test < len(test.texts):
        ix = sorted(np.random.default_rng(seed).choice(len(test.texts), max_test, replace=False))
        test = Examples([test.texts[i] for i in ix], [test.labels[i] for i in ix], test.source)
    return test


def dev_data_read(task, dev_file: str | None, purpose: str) -> dict:
    """The ``data_read`` entry of a dev set used for ``purpose``."""
    if dev_file is not None:
        return {"data": f"public dev file {dev_file} ({purpose})", "private": False}
    return {
        "data": f"dev slice ({task.dev_size} rows at most) of private split "
        f"{task.private_split!r} ({purpose})",
        "private": True,
        "covered_by_dp": False,
    }


def evaluate_task(config: EvaluateConfig, runtime: Runtime | None = None) -> dict:
    """``gradmm evaluate``: zero- or ``few_shot``-shot accuracy on the task's test split, with
    demonstrations from ``dev_file`` (public) or the dev slice of the private split."""
    from gradmm.core.lm import place
    from gradmm.core.tokens import tokenize_prompt
    from gradmm.data.tasks import load_task
    from gradmm.models.loading import load_model

    task = load_task(config.task)
    few_shot, seed = config.few_shot, config.seed
    test = test_set(task, config.data_dir, config.max_test, seed)
    data_read = [{"data": f"test split {task.test_split!r}", "private": False}]
    dev = None
    if few_shot:
        dev = dev_set(task, config.data_dir, config.dev_file)
        data_read.append(dev_data_read(task, config.dev_file, "few-shot demonstrations"))
    lm = place(load_model(config.model), runtime)
    prompt = tokenize_prompt(task, lm.tokenizer)
    prefix = demonstrations(lm, prompt, dev, few_shot, seed) if dev is not None else []
    result = accuracy(lm, prompt, test, task.label_names, prefix)
    result.update(
        stage="evaluate",
        model=config.model,
        task=task.name,
        few_shot=few_shot,
        seed=seed,
        data_read=data_read,
    )
    return result


@torch.no_grad()
def text_perplexities(lm: LoadedModel, texts: list[str], batch_size: int = 16) -> list[float]:
    """Per text, exp(mean NLL of its tokens) under ``lm``, each text alone after one BOS (or EOS)
    token: the same scoring for real and synthetic text, with no template or task prefix."""
    start = lm.tokenizer.bos_token_id
    if start is None:
        start = lm.tokenizer.eos_token_id
    if start is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start texts with")
    longest = (lm.context_length or 1 << 30) - 1  # longer texts: their first tokens only
    seqs = [[start] + encode_text(lm.tokenizer, t)[:longest] for t in texts]
    out = []
    for first in range(0, len(seqs), batch_size):
        ids, mask, _ = right_padded(seqs[first : first + batch_size], lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        )
        valid = mask[:, 1:].to(nll.dtype)
        out += ((nll * valid).sum(1) / valid.sum(1).clamp(min=1)).exp().cpu().tolist()
    return out
