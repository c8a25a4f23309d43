"""The methods an experiment compares, as a registry: ``METHODS[name].run(cell) -> result``
(a :class:`gradmm.experiments.results.MethodResult`).

Each method turns one cell (task, seed, ε) into a result row through the same stages as the
command line (release, generate, filter, finetune, evaluate). Real examples used by the
real-data baselines are written only to a temporary folder, never under the experiment folder.

* ``zero_shot``, ``few_shot``: ``gradmm evaluate`` (k demonstrations per class from the dev slice);
* ``real_private`` (fine-tune on the private pool itself), ``real_random`` (as many random real
  examples of the private split as the synthetic sets have);
* ``lm_prompted``: label-conditioned sampling from the same LM, prompted with the task's public
  demonstrations;
* ``lm_prompted_filtered``: those texts through the experiment's filter, as GRADMM's are;
* ``gradmm_paper``, ``gradmm``, ``gradmm_lm`` (from the LM's own text); ``lm_selected`` (the LM's
  texts picked by gradient matching); per ε ``dp_gradmm`` and ``dp_noise`` (a noise-only release
  of the same σ); ``dp_none`` (no matching: the projection of random embeddings);
* ``real_private_size_matched``, ``real_random_size_matched``, ``lm_prompted_size_matched``,
  ``lm_prompted_filtered_size_matched``: the baseline's training set cut, per class, to the
  filtered ``gradmm`` set of the same task and seed, so that no method wins by training on more
  examples; the same ending ``_to_gradmm_lm``: cut to the ``gradmm_lm`` set.

The DP releases of an experiment are *simulations*: their noise is seeded from (task, seed, kind,
ε), so that the table reproduces, and is recorded as seeded (no guarantee). Every release draws
from its own stream, so a DP release and its noise-only control never share noise.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradmm.core.lm import place
from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import Task, load_task
from gradmm.experiments.results import MethodResult, read_result
from gradmm.files import read_json, read_jsonl, write_jsonl
from gradmm.models.loading import load_model
from gradmm.options import build_config
from gradmm.stages.configs import (
    EvaluateConfig,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    ReleaseConfig,
    SelectConfig,
)
from gradmm.stages.evaluate import evaluate_task
from gradmm.stages.filtering import filter_rows, filter_run
from gradmm.stages.finetune import finetune
from gradmm.stages.generate import generate
from gradmm.stages.quality import set_quality
from gradmm.stages.record import load_release
from gradmm.stages.release import eligible_rows, pool_rows, release_targets
from gradmm.stages.sampling import lm_prompted_examples
from gradmm.stages.selection import select_texts


@dataclass(frozen=True)
class Cell:
    """One cell of an experiment: ``cfg`` is the
    :class:`gradmm.experiments.runner.ExperimentConfig`,
    ``out`` the experiment folder."""

    cfg: Any
    out: Path
    task: str
    method: str
    seed: int
    epsilon: float | None
    pool_size: int | None = None  # a DP study's pool size n (None: the experiment's n_per_class)
    match_params: str | None = None  # a DP study's released gradient (None: the output layer)

    @property
    def name(self) -> str:
        return cell_name(self.method, self.epsilon, self.pool_size, self.match_params)

    @property
    def folder(self) -> Path:
        return cell_folder(self.out, self.task, self.name, self.seed)


def cell_name(
    method: str, epsilon: float | None, pool_size: int | None = None, match: str | None = None
) -> str:
    """The method and a cell's settings of the DP axes, e.g. ``dp_gradmm_eps1_n250``."""
    name = method if epsilon is None else f"{method}_eps{epsilon:g}"
    name += "" if pool_size is None else f"_n{pool_size}"
    return name + ("" if match is None else f"_{match}")


def cell_folder(out: Path, task: str, name: str, seed: int) -> Path:
    """The folder of the cell ``name`` (:func:`cell_name`) of ``task`` and ``seed``."""
    return out / "cells" / task / name / f"seed{seed}"


Run = Callable[[Cell], MethodResult]  # a method: run(cell) -> what it measured


@dataclass(frozen=True)
class Method:
    name: str
    run: Run
    per_epsilon: bool = False  # one cell per ε of the experiment
    demonstrations: bool = False  # needs the task's public demonstrations
    synthetic: bool = False  # trains on generated text (filtered: the classifier needs demos)
    after: str | None = None  # reads this method's cell of the same task and seed
    opt_in: bool = False  # run only when the experiment file names it (not in DEFAULT_METHODS)


METHODS: dict[str, Method] = {}


def method(name: str, **flags) -> Callable[[Run], Run]:
    """Register ``run(cell) -> result`` as method ``name`` (flags: see :class:`Method`)."""

    def register(run: Run) -> Run:
        METHODS[name] = Method(name, run, **flags)
        return run

    return register


# ------------------------------------------------------------------------------------ stages


def shared_release(
    cfg,
    out,
    task,
    seed,
    kind: str,
    eps: float | None = None,
    n: int | None = None,
    match: str | None = None,
) -> Path:
    """A release shared by the cells of (task, seed): default, paper, dp or noise (the DP ones
    of pool size ``n`` and released gradient ``match`` in a DP study)."""
    name = cell_name(kind, eps, n, match)
    path = out / "releases" / task / f"seed{seed}" / name
    if (path / "release.json").exists():
        return path
    rc = dict(
        task=task,
        model=cfg.model,
        n_per_class=n or cfg.n_per_class,
        seed=seed,
        data_dir=cfg.data_dir,
    )
    if kind == "paper":
        rc["preset"] = "paper"
    if kind in ("dp", "noise"):
        rc.update(epsilon=eps, delta=cfg.dp_delta, clip=cfg.dp_clip)
        rc["target"] = "noise" if kind == "noise" else "real"
        # A simulation on public data: seeded noise so that the table reproduces (recorded as
        # seeded: no guarantee). A real private release draws from the OS CSPRNG (the default).
        rc["noise_seed"] = simulation_noise_seed(task, seed, name)
        if match is not None:
            rc["match_params"] = match
            rc["sketch_dim"] = cfg.dp_sketch_dim if match == "sketch" else None
        if cfg.dp_sampling == "poisson":
            rc.update(
                sampling="poisson",
                neighbouring="add-remove",
                sampling_rate=poisson_rate(load_task(task), rc["n_per_class"], cfg.data_dir),
            )
    release_targets(ReleaseConfig(**rc), path, runtime=cfg.runtime)
    return path


def poisson_rate(task: Task, n_per_class: int, data_dir: str | None) -> float:
    """The Poisson rate whose expected pool has ``n_per_class`` examples per class on average:
    ``n·C`` over the private split's rows outside the dev slice (capped at 1). It reads the
    split's size, which the guarantee then assumes public (as DP-SGD's sampling rate does)."""
    return min(1.0, n_per_class * task.num_classes / eligible_rows(task, data_dir))


def simulation_noise_seed(task: str, seed: int, release_name: str) -> int:
    """128-bit noise seed of one simulated release: distinct releases get independent streams."""
    digest = hashlib.sha256(f"gradmm-experiment/{task}/{seed}/{release_name}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


def synthetic_set(cell: Cell, release: Path, **extra) -> Path:
    """Generate (the experiment's ``generate`` options, overridden by ``extra``) and filter in
    ``cell``'s folder; each step is skipped when its output exists. Returns the filtered set."""
    cfg, seed = cell.cfg, cell.seed
    run = cell.folder / "run"
    if not (run / "synthetic.jsonl").exists():
        options = {**cfg.generate, "per_class": cfg.synthetic_per_class, "seed": seed, **extra}
        generate(
            release, run, build_config(GenerateConfig, options), progress=False, runtime=cfg.runtime
        )
    if not (run / "filtered.jsonl").exists():
        filter_run(run, build_config(FilterConfig, cfg.filter), runtime=cfg.runtime)
    return run / "filtered.jsonl"


def train_and_describe(
    cfg, task, seed, train: Path, release: Path, samples: bool = True
) -> MethodResult:
    """Fine-tune on ``train`` and describe the training texts: per-class counts, their quality
    (:func:`gradmm.stages.quality.set_quality`, the matching loss against ``release``: the
    method's own, or the default release of the task and seed for a baseline), the median and
    mean of their perplexities under the experiment's model (the same scoring for every method)
    and, when ``samples`` (never for real text), the first three texts of each class."""
    ft = FinetuneConfig(
        **{
            **cfg.finetune,
            "model": cfg.model,
            "task": task,
            "train": str(train),
            "data_dir": cfg.data_dir,
            "seed": seed,
        }
    )
    result = finetune(ft, progress=False, runtime=cfg.runtime)
    rows = read_jsonl(train)
    task = load_task(task)
    names = task.label_names
    texts = [[r["text"] for r in rows if r["label"] == c] for c in range(len(names))]
    lm = place(load_model(cfg.model), cfg.runtime)
    quality = set_quality(lm, task, rows, cfg.data_dir, load_release(release))
    return MethodResult(
        test_accuracy=result["test_accuracy"],
        dev_accuracy=result["dev_accuracy"],
        selected_step=result["selected_step"],
        dev_curve=[
            {"step": h["step"], "accuracy": None if h["dev"] is None else h["dev"]["accuracy"]}
            for h in result["history"]
        ],
        train_examples=result["train_examples"],
        test_per_class_accuracy=result["test_per_class_accuracy"],
        train_loss=result["train_loss"],
        train_per_class=[len(t) for t in texts],
        train_perplexity=quality["median_perplexity"],
        train_perplexity_mean=quality["mean_perplexity"],
        samples=dict(zip(names, [t[:3] for t in texts], strict=True)) if samples else None,
        quality={k: v for k, v in quality.items() if k not in ("examples", "per_class")},
    )


def real_training_rows(cfg, task, seed: int, method: str) -> list[dict]:
    """The real training set of ``real_private`` (this seed's pool) or ``real_random``."""
    if method == "real_private":  # exactly the pool of this seed's release
        n, pool_seed = cfg.n_per_class, seed
    else:
        n, pool_seed = cfg.synthetic_per_class, seed + 10_000
    return pool_rows(task, n, pool_seed, cfg.data_dir)


# ----------------------------------------------------------------------------------- methods


def _evaluate(cell: Cell, k: int) -> MethodResult:
    config = EvaluateConfig(
        model=cell.cfg.model,
        task=cell.task,
        few_shot=k,
        data_dir=cell.cfg.data_dir,
        max_test=cell.cfg.finetune.get("max_test"),
        seed=cell.seed,
    )
    res = evaluate_task(config, runtime=cell.cfg.runtime)
    return MethodResult(
        test_accuracy=res["accuracy"],
        test_per_class_accuracy=res["per_class_accuracy"],
        dev_accuracy=None,
    )


@method("zero_shot")
def zero_shot(cell: Cell) -> MethodResult:
    return _evaluate(cell, 0)


@method("few_shot")
def few_shot(cell: Cell) -> MethodResult:
    return _evaluate(cell, cell.cfg.few_shot_k)


def _real(cell: Cell) -> MethodResult:
    with tempfile.TemporaryDirectory() as tmp:  # real text never lands under OUT
        train = Path(tmp) / "train.jsonl"
        write_jsonl(
            train, real_training_rows(cell.cfg, load_task(cell.task), cell.seed, cell.method)
        )
        rel = shared_release(cell.cfg, cell.out, cell.task, cell.seed, "default")
        return train_and_describe(cell.cfg, cell.task, cell.seed, train, rel, samples=False)


method("real_private")(_real)
method("real_random")(_real)


def _lm_prompted_set(cell: Cell) -> Path:
    """The ``lm_prompted`` cell's training set (sampled once, kept in that cell's folder)."""
    train = cell_folder(cell.out, cell.task, "lm_prompted", cell.seed) / "synthetic.jsonl"
    if not train.exists():
        task = load_task(cell.task)
        lm = place(load_model(cell.cfg.model), cell.cfg.runtime)
        prompt = tokenize_prompt(task, lm.tokenizer)
        rows = lm_prompted_examples(lm, task, prompt, cell.cfg.synthetic_per_class, cell.seed)
        write_jsonl(train, rows)
    return train


@method("lm_prompted", demonstrations=True)
def lm_prompted(cell: Cell) -> MethodResult:
    rel = shared_release(cell.cfg, cell.out, cell.task, cell.seed, "default")
    return train_and_describe(cell.cfg, cell.task, cell.seed, _lm_prompted_set(cell), rel)


@method("lm_prompted_filtered", demonstrations=True, synthetic=True, opt_in=True)
def lm_prompted_filtered(cell: Cell) -> MethodResult:
    """``lm_prompted``'s texts through the experiment's filter against the default release, as
    GRADMM's texts are filtered (post-processing of the release, so a DP release stays DP)."""
    rel = shared_release(cell.cfg, cell.out, cell.task, cell.seed, "default")
    train = _lm_prompted_filtered_set(cell)
    return train_and_describe(cell.cfg, cell.task, cell.seed, train, rel)


def _lm_prompted_filtered_set(cell: Cell) -> Path:
    """The ``lm_prompted_filtered`` cell's training set (filtered once, kept in its folder)."""
    cfg = cell.cfg
    train = cell_folder(cell.out, cell.task, "lm_prompted_filtered", cell.seed) / "filtered.jsonl"
    if not train.exists():
        rel = load_release(shared_release(cfg, cell.out, cell.task, cell.seed, "default"))
        lm = place(load_model(cfg.model), cfg.runtime)
        rows = read_jsonl(_lm_prompted_set(cell))
        kept, _ = filter_rows(lm, rel, rows, build_config(FilterConfig, cfg.filter))
        write_jsonl(train, kept)
    return train


def _gradmm(kind: str, section: str | None = None, **generate_options) -> Run:
    """A GRADMM method: release ``kind`` (default, paper, dp, noise), generate (the experiment's
    ``generate`` options, changed by ``generate_options`` and then by the experiment file's
    ``section``), filter, train."""

    def run(cell: Cell) -> MethodResult:
        eps = cell.epsilon if kind in ("dp", "noise") else None
        if cell.method == "dp_none":  # no matching, so any DP release serves; the first ε's
            eps = cell.cfg.dp_epsilons[0]
        rel = shared_release(
            cell.cfg, cell.out, cell.task, cell.seed, kind, eps, cell.pool_size, cell.match_params
        )
        changes = {**generate_options, **(getattr(cell.cfg, section) if section else {})}
        train = synthetic_set(cell, rel, **changes)
        result = train_and_describe(cell.cfg, cell.task, cell.seed, train, rel)
        return result.model_copy(
            update={
                "mean_rec_loss": read_json(train.parent / "manifest.json")["mean_rec_loss"],
                "privacy": load_release(rel).meta.mechanism.model_dump(mode="json"),
            }
        )

    return run


method("gradmm_paper", synthetic=True)(_gradmm("paper", preset="paper"))
method("gradmm", synthetic=True)(_gradmm("default"))
# GRADMM from the LM's own class-conditional text (generate --init lm), its other changes under
# the experiment file's generate_lm
method("gradmm_lm", synthetic=True, demonstrations=True, opt_in=True)(
    _gradmm("default", "generate_lm", init="lm")
)
method("dp_gradmm", synthetic=True, per_epsilon=True)(_gradmm("dp"))
method("dp_noise", synthetic=True, per_epsilon=True)(_gradmm("noise"))
method("dp_none", synthetic=True)(_gradmm("dp", target="none"))


@method("lm_selected", demonstrations=True)
def lm_selected(cell: Cell) -> MethodResult:
    """``gradmm select``: as many of the LM's own texts as the synthetic sets have, picked by
    gradient matching against the default release from a larger sampled pool (unfiltered, as
    ``lm_prompted``)."""
    cfg = cell.cfg
    rel = shared_release(cfg, cell.out, cell.task, cell.seed, "default")
    run = cell.folder / "run"
    if not (run / "synthetic.jsonl").exists():
        options = {**cfg.select, "per_class": cfg.synthetic_per_class, "seed": cell.seed}
        select_texts(
            rel, run, build_config(SelectConfig, options), progress=False, runtime=cfg.runtime
        )
    result = train_and_describe(cfg, cell.task, cell.seed, run / "synthetic.jsonl", rel)
    return result.model_copy(
        update={
            "mean_rec_loss": read_json(run / "manifest.json")["mean_rec_loss"],
            "privacy": load_release(rel).meta.mechanism.model_dump(mode="json"),
        }
    )


# ------------------------------------------------------------------------- equal-size baselines


def cut_per_class(rows: list[dict], counts: list[int], seed: int) -> list[dict]:
    """At most ``counts[c]`` rows of each class c: a seeded random subset, in ``rows``' order
    (all of a class's rows, in order, where it has no more than ``counts[c]``)."""
    rng = np.random.default_rng(seed)
    keep = set()
    for c, n in enumerate(counts):
        ix = [i for i, r in enumerate(rows) if r["label"] == c]
        keep.update(ix if len(ix) <= n else rng.choice(ix, n, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def _size_matched(base: str, target: str) -> Run:
    """``base``'s training set cut to the per-class counts of the filtered ``target`` set (a
    GRADMM variant) of the same task and seed. Where nothing is cut, the run would repeat
    ``base``'s exactly (same rows, order and seed), so ``base``'s finished cell is reused."""

    def run(cell: Cell) -> MethodResult:
        cfg, seed = cell.cfg, cell.seed
        target_cell = cell_folder(cell.out, cell.task, target, seed)
        counts = read_result(target_cell / "result.json").train_per_class
        if counts is None:  # a cell finished before results recorded it: count its set
            labels = [r["label"] for r in read_jsonl(target_cell / "run" / "filtered.jsonl")]
            counts = [labels.count(c) for c in range(load_task(cell.task).num_classes)]
        with tempfile.TemporaryDirectory() as tmp:  # real text never lands under OUT
            if base == "lm_prompted":
                rows = read_jsonl(_lm_prompted_set(cell))
            elif base == "lm_prompted_filtered":
                rows = read_jsonl(_lm_prompted_filtered_set(cell))
            else:
                rows = real_training_rows(cfg, load_task(cell.task), seed, base)
            cut = cut_per_class(rows, counts, seed)
            done = cell_folder(cell.out, cell.task, base, seed) / "result.json"
            if len(cut) == len(rows) and done.exists():
                reused = read_result(done).measured()
                return reused.model_copy(update={"samples": None, "same_as": base})
            train = Path(tmp) / "train.jsonl"
            write_jsonl(train, cut)
            rel = shared_release(cfg, cell.out, cell.task, seed, "default")
            return train_and_describe(cfg, cell.task, seed, train, rel, samples=False)

    return run


def size_matched_name(base: str, target: str) -> str:
    """``real_private_size_matched`` (cut to ``gradmm``), ``..._size_matched_to_gradmm_lm``."""
    return f"{base}_size_matched" + ("" if target == "gradmm" else f"_to_{target}")


for _target in ("gradmm", "gradmm_lm"):
    for _base in ("real_private", "real_random", "lm_prompted", "lm_prompted_filtered"):
        method(
            size_matched_name(_base, _target),
            after=_target,
            demonstrations=_base.startswith("lm_prompted"),
            opt_in=_target != "gradmm" or _base == "lm_prompted_filtered",
        )(_size_matched(_base, _target))

# what a grid runs when its file names no methods: the first grid's (the second round's are opt-in)
DEFAULT_METHODS = [name for name, m in METHODS.items() if not m.opt_in]
