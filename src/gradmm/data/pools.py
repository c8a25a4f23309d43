"""The private pool: which real examples a release reads. The only module that selects private
rows; only :mod:`gradmm.stages.release` imports it (``pyproject.toml``, ``[tool.importlinter]``).

Three ways to draw it, all outside the dev and judge slices (:func:`private_pool_exclusions`): a
fixed number per class, seeded (:func:`private_pool`); a Poisson sample from the OS CSPRNG
(:func:`poisson_pool`, for amplification); and, for canary audits, rows planted in the pool
(:func:`planted_pool`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gradmm.data.tasks import (
    Examples,
    Task,
    dev_indices,
    examples_from_rows,
    judge_indices,
    load_examples,
)
from gradmm.errors import UserError, warn
from gradmm.files import read_jsonl_numbered
from gradmm.privacy.noise import uniforms


def sample_per_class(
    labels: list[int],
    names: tuple[str, ...],
    n: int,
    seed: int,
    exclude: list[int] | None = None,
) -> list[list[int]]:
    """Indices of ``n`` examples of each class, drawn without replacement (seeded, stratified),
    never from ``exclude`` (the dev slice)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    allowed = np.ones(len(labels_arr), dtype=bool)
    allowed[exclude or []] = False
    picked = []
    for c, name in enumerate(names):
        pool = np.flatnonzero((labels_arr == c) & allowed)
        if len(pool) < n:
            raise UserError(
                f"class {c} ({name!r}) has {len(pool)} examples, fewer than the {n} requested"
            )
        picked.append(sorted(rng.choice(pool, size=n, replace=False).tolist()))
    return picked


def private_pool(
    task: Task, split: str, n_per_class: int, seed: int, data_dir: str | None
) -> tuple[Examples, list[list[int]]]:
    """The private split and, per class, the indices of the pool a release with these settings
    reads: ``n_per_class`` per class, seeded, never from the dev slice. The one definition of the
    pool (release, audit and the experiment's ``real_private`` baseline all use it)."""
    examples = load_examples(task, split, data_dir)
    exclude = private_pool_exclusions(task, split, examples)
    return examples, sample_per_class(examples.labels, task.label_names, n_per_class, seed, exclude)


def poisson_pool(
    task: Task, split: str, rate: float, data_dir: str | None, random_bytes: Callable[[int], bytes]
) -> tuple[Examples, list[list[int]]]:
    """The private split and, per class, the indices of a Poisson sample: every row outside the
    dev slice kept independently with probability ``rate``, decided by ``random_bytes`` (the OS
    CSPRNG for a real release: the amplification needs a sample nobody can predict)."""
    examples = load_examples(task, split, data_dir)
    excluded = set(private_pool_exclusions(task, split, examples))
    held_out = task.dev_size + task.judge_size
    if excluded and len(examples.labels) < 2 * held_out:
        warn(
            f"{examples.source} has {len(examples.labels)} rows, fewer than twice the dev and "
            f"judge slices' {held_out}: they are half the split, so one row added or removed may "
            "also move another row across it, and the guarantee holds for groups of two rows "
            "(docs/privacy.md)"
        )
    kept = uniforms(len(examples.labels), random_bytes) < rate
    picked = [[] for _ in task.label_names]
    for i, (label, keep) in enumerate(zip(examples.labels, kept, strict=True)):
        if keep and i not in excluded:
            picked[label].append(i)
    return examples, picked


def planted_pool(
    task: Task, examples: Examples, picked: list[list[int]], canary_file: str | Path
) -> tuple[Examples, list[list[int]]]:
    """The pool with the rows of ``canary_file`` added to their classes (canary audits)."""
    extra = examples_from_rows(task, read_jsonl_numbered(Path(canary_file)), canary_file)
    start = len(examples.texts)
    merged = Examples(examples.texts + extra.texts, examples.labels + extra.labels, examples.source)
    picked = [list(ix) for ix in picked]
    for j, label in enumerate(extra.labels):
        picked[label].append(start + j)
    return merged, picked


def private_pool_exclusions(task: Task, split: str, examples: Examples) -> list[int]:
    """Rows of ``examples`` (the ``split``) a private pool may not use: the dev and judge slices,
    when sampling from the private split."""
    if split != task.private_split:
        return []
    judge = judge_indices(examples, task.dev_size, task.judge_size)
    return sorted(dev_indices(examples, task.dev_size) + judge)
