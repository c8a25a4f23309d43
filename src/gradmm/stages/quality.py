"""The quality of a training set, measured the same way for every set (``gradmm quality``).

* **matching loss**: per class, the texts in file order cut into batches of ``batch`` (B = 10, the
  solver's problems), each batch's ``rec`` against the class's released target, averaged over
  batches and classes (forward passes only, :mod:`gradmm.core.subset`); needs a release.
* **median perplexity**: :func:`gradmm.stages.evaluate.text_perplexities`, each text alone after
  one BOS token: one scoring rule for real and synthetic text.
* **label fidelity**: the fraction of texts that an independent judge assigns to their intended
  class. The judge is a TF-IDF (word 1-2 grams) logistic regression (scikit-learn) trained on the
  task's judge slice: real training rows that no private pool ever reads
  (:func:`gradmm.data.tasks.judge_indices`); its accuracy on the test split is reported beside
  it. It shares nothing with the LM, so text optimised against the LM's gradients cannot game it.
* **diversity**: distinct-2, the fraction of distinct word bigrams among all bigrams of the set.

The judge slice belongs to the private split: the report is a measurement that reads private
rows outside every pool and is not covered by any DP guarantee; nothing it computes feeds back
into a training set.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gradmm.core.lm import LoadedModel, place
from gradmm.core.settings import Runtime
from gradmm.core.subset import pool_gradients
from gradmm.core.tokens import label_hidden
from gradmm.data.tasks import Task, examples_from_rows, judge_indices, load_examples, load_task
from gradmm.errors import UserError
from gradmm.files import read_jsonl_numbered
from gradmm.models.loading import load_model
from gradmm.stages.configs import QualityConfig
from gradmm.stages.evaluate import text_perplexities
from gradmm.stages.filtering import release_loss
from gradmm.stages.record import Release, load_release, load_release_model

MATCHING_BATCH = 10  # B of the solver's problems: losses of batches of the same size compare


@dataclass(frozen=True)
class Judge:
    """A label classifier independent of the LM: ``predict(texts) -> classes``."""

    model: object  # a fitted scikit-learn pipeline
    train_rows: int
    test_accuracy: float

    def predict(self, texts: list[str]) -> list[int]:
        return [int(y) for y in self.model.predict(texts)]


def train_judge(task: Task, data_dir: str | None) -> Judge | None:
    """The task's judge, trained on its judge slice (deterministic: same data, same judge);
    None when the slice lacks a class (no ``judge_size``, or a split too small for one)."""
    return _judge(task.model_dump_json(), data_dir)


@lru_cache(maxsize=8)
def _judge(task_json: str, data_dir: str | None) -> Judge | None:
    task = Task.model_validate_json(task_json)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    split = load_examples(task, task.private_split, data_dir)
    rows = judge_indices(split, task.dev_size, task.judge_size)
    if len({split.labels[i] for i in rows}) < task.num_classes:
        return None
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=10.0, max_iter=2000),
    )
    model.fit([split.texts[i] for i in rows], [split.labels[i] for i in rows])
    test = load_examples(task, task.test_split, data_dir)
    hits = [p == y for p, y in zip(model.predict(test.texts), test.labels, strict=True)]
    return Judge(model, len(rows), sum(hits) / len(hits))


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word ``n``-grams over all ``n``-grams of ``texts`` (lower-cased; 0 if none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.lower().split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def matching_loss(lm: LoadedModel, release: Release, rows: list[dict]) -> float:
    """Mean ``rec`` of each class's texts in batches of :data:`MATCHING_BATCH` (file order)."""
    loss, prompt = release_loss(lm, release), release.prompt
    recs = []
    for c in range(release.task.num_classes):
        seqs = [prompt.encode(lm.tokenizer, r["text"]) for r in rows if r["label"] == c]
        if not seqs:
            continue
        h = torch.cat(
            [
                label_hidden(lm, loss.labels, seqs[k : k + 32], [c] * len(seqs[k : k + 32]))
                for k in range(0, len(seqs), 32)
            ]
        )
        gradients = pool_gradients(loss, h, c)
        recs += [
            gradients.rec(list(range(k, min(k + MATCHING_BATCH, len(seqs)))))
            for k in range(0, len(seqs), MATCHING_BATCH)
        ]
    return statistics.mean(recs)


def set_quality(
    lm: LoadedModel,
    task: Task,
    rows: list[dict],
    data_dir: str | None,
    release: Release | None = None,
) -> dict:
    """The quality columns of the training set ``rows`` (``{"text", "label"}``): see the module
    docstring. ``matching_loss`` is None without a ``release``, ``label_fidelity`` None for a
    task without a judge (:func:`train_judge`)."""
    if not rows:
        raise UserError("the training set is empty")
    texts = [r["text"] for r in rows]
    perplexities = text_perplexities(lm, texts)
    judge = train_judge(task, data_dir)
    fidelity = None
    if judge is not None:
        hits = [p == r["label"] for p, r in zip(judge.predict(texts), rows, strict=True)]
        fidelity = sum(hits) / len(hits)
    return {
        "examples": len(rows),
        "per_class": [sum(r["label"] == c for r in rows) for c in range(task.num_classes)],
        "matching_loss": None if release is None else round(matching_loss(lm, release, rows), 5),
        "median_perplexity": round(statistics.median(perplexities), 2),
        "mean_perplexity": round(statistics.mean(perplexities), 2),
        "label_fidelity": None if fidelity is None else round(fidelity, 4),
        "judge_test_accuracy": None if judge is None else round(judge.test_accuracy, 4),
        "judge_train_rows": None if judge is None else judge.train_rows,
        "distinct_2": round(distinct_n(texts), 4),
        "data_read": [
            {
                "data": f"judge slice ({task.judge_size} rows at most) of private split "
                f"{task.private_split!r}, outside every pool, and the test split (the judge's "
                "accuracy)",
                "private": True,
                "covered_by_dp": False,
            }
        ]
        if judge is not None
        else [],
    }


def quality_report(config: QualityConfig, runtime: Runtime | None = None) -> dict:
    """``gradmm quality``: :func:`set_quality` of the file ``config.data``."""
    release = None if config.release is None else load_release(Path(config.release))
    if release is not None and config.task not in (None, release.task.name):
        raise UserError(f"--task {config.task} differs from the release's {release.task.name}")
    task = release.task if release is not None else load_task(config.task)
    examples = examples_from_rows(task, read_jsonl_numbered(Path(config.data)), config.data)
    if release is not None and config.model is None:
        lm = load_release_model(release, runtime)
    else:
        lm = place(load_model(config.model), runtime)
    rows = [{"text": t, "label": y} for t, y in zip(examples.texts, examples.labels, strict=True)]
    result = set_quality(lm, task, rows, config.data_dir, release)
    return {"stage": "quality", "data": config.data, "task": task.name, **result}
