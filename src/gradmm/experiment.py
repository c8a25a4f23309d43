"""Experiment runner: tasks x methods x seeds through the same fine-tuning and evaluation code.

Every cell writes ``OUT/cells/<task>/<method>/seed<k>/result.json`` and is skipped when that file
exists, so an interrupted run resumes. Releases are shared by the cells of one (task, seed).
Real examples used by the real-data baselines are written only to a temporary folder that is
deleted afterwards, never under ``OUT``. The protocol is in ``docs/evaluation.md``.

Methods: ``zero_shot``, ``few_shot`` (k demonstrations per class from the dev slice),
``real_private`` (fine-tune on the private pool itself), ``real_random`` (as many random real
examples of the private split as the synthetic sets have), ``lm_prompted`` (label-conditioned
sampling from the same LM, prompted with hand-written public demonstrations), ``gradmm_paper``,
``gradmm``, and for each ε: ``dp_gradmm``, ``dp_noise`` (a noise-only release of the same σ)
and, once per seed, ``dp_none`` (no matching: the projection of random embeddings).

The DP releases of an experiment are *simulations*: their noise is seeded from (task, seed, kind,
ε), so that the table reproduces, and is recorded as seeded (no guarantee). Every release draws
from its own stream, so a DP release and its noise-only control never share noise. One private
pool is released under each ε, without DP and as ``real_private`` training data: each ε row is a
separate simulation of what that ε alone would give, not a composed guarantee.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from gradmm.config import build_config
from gradmm.errors import UserError
from gradmm.evaluate import accuracy, demonstrations, eval_sets, text_perplexities
from gradmm.files import (
    OutputKind,
    check_output_dir,
    make_output_dir,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
    write_text,
)
from gradmm.filtering import FilterConfig, filter_run
from gradmm.finetune import FinetuneConfig, finetune
from gradmm.generate import generate, resolve_config
from gradmm.models import fingerprint, load_model
from gradmm.release import ReleaseConfig, load_release, private_pool, release_targets
from gradmm.tasks import encode_text, load_task, tokenize_prompt

METHODS = ("zero_shot", "few_shot", "real_private", "real_random", "lm_prompted",
           "gradmm_paper", "gradmm", "dp_gradmm", "dp_noise", "dp_none")  # fmt: skip


EXPERIMENT_DIR = OutputKind(
    "experiment",
    "experiment.json",
    ("experiment.json", "cells", "releases", "results.csv", "results.md", "*.png"),
)


class ExperimentConfig(BaseModel):
    """An experiment file (YAML). ``generate``/``filter``/``finetune`` hold stage options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = "reference"
    data_dir: str | None = None
    tasks: list[str] = Field(min_length=1)
    methods: list[str] = list(METHODS)
    seeds: list[int] = [0, 1, 2]
    n_per_class: int = Field(25, ge=1, description="private pool per class")
    synthetic_per_class: int = Field(50, ge=1)
    few_shot_k: int = Field(2, ge=1)
    dp_epsilons: list[float] = [1.0, 8.0]
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    generate: dict[str, Any] = {}
    filter: dict[str, Any] = {}
    finetune: dict[str, Any] = {}


def load_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment file, every stage section included."""
    cfg = build_config(ExperimentConfig, {}, path)
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    # every stage section is validated now: a typo is one line before any cell runs
    classifier = build_config(FilterConfig, cfg.filter).classifier
    resolve_config({**cfg.generate, "per_class": cfg.synthetic_per_class})
    for section in ("model", "task", "train", "data_dir", "seed"):
        if section in cfg.finetune:
            raise UserError(f"finetune: {section!r} is set by the runner, not the experiment file")
    build_config(FinetuneConfig, {**cfg.finetune, "model": cfg.model, "task": cfg.tasks[0],
                                  "train": "-"})  # fmt: skip
    # methods that need a task's public demonstrations: refused now, not an hour into the run
    synthetic = {"gradmm_paper", "gradmm", "dp_gradmm", "dp_noise", "dp_none"}
    for name in cfg.tasks:
        task = load_task(name)
        if "lm_prompted" in cfg.methods:
            task.require_demonstrations("the lm_prompted baseline")
        if classifier and synthetic & set(cfg.methods):
            task.require_demonstrations("the filter's few-shot classifier (filter: {classifier: "
                                        "false} turns it off)")  # fmt: skip
    return cfg


def cells(cfg: ExperimentConfig) -> list[tuple[str, str, int, float | None]]:
    """(task, method, seed, epsilon) of every cell, in run order."""
    out = []
    for task in cfg.tasks:
        for seed in cfg.seeds:
            for method in cfg.methods:
                if method in ("dp_gradmm", "dp_noise"):
                    out += [(task, method, seed, eps) for eps in cfg.dp_epsilons]
                else:
                    out.append((task, method, seed, None))
    return out


def cell_dir(out: Path, task: str, method: str, seed: int, eps: float | None) -> Path:
    name = method if eps is None else f"{method}_eps{eps:g}"
    return out / "cells" / task / name / f"seed{seed}"


def run_experiment(config_path: Path, out: Path, progress: bool = True) -> list[dict]:
    """Run (or resume) every cell, then write results.csv, results.md and the plots."""
    cfg = load_experiment(config_path)
    out = Path(out)
    check_output_dir(out, EXPERIMENT_DIR)
    make_output_dir(out, EXPERIMENT_DIR)
    weights = fingerprint(load_model(cfg.model).model)
    settings = {**cfg.model_dump(mode="json"), "model_fingerprint": weights}
    _check_same_settings(settings, out / "experiment.json")
    write_json(out / "experiment.json", settings)
    todo = cells(cfg)
    # Finished cells are left out of the bar so its rate and time left count only real work.
    pending = [c for c in todo if not (cell_dir(out, *c) / "result.json").exists()]
    desc = f"experiment ({len(todo) - len(pending)} of {len(todo)} cells already done)"
    bar = tqdm(pending, desc=desc, unit="cell", disable=not progress)
    for task, method, seed, eps in bar:
        path = cell_dir(out, task, method, seed, eps) / "result.json"
        bar.set_postfix_str(f"{task}/{method}{'' if eps is None else f'@{eps:g}'}/seed{seed}")
        started = time.time()
        result = run_cell(cfg, out, task, method, seed, eps)
        result.update(task=task, method=method, seed=seed, epsilon=eps,
                      seconds=round(time.time() - started, 1))  # fmt: skip
        write_json(path, result)
    rows = [read_json(cell_dir(out, *c) / "result.json") for c in todo]
    write_tables(rows, out)
    plot(rows, out)
    return rows


# Fields that only select cells: a resumed run may change them (e.g. add a seed).
CELL_SELECTION = ("tasks", "methods", "seeds", "dp_epsilons")


def _check_same_settings(settings: dict, recorded: Path) -> None:
    """Refuse to resume ``recorded``'s cells under other settings or model weights."""
    if not recorded.exists():
        return
    before = read_json(recorded)
    changed = sorted(
        k for k, v in settings.items() if k not in CELL_SELECTION and before.get(k) != v
    )
    if changed:
        raise UserError(
            f"{recorded.parent} holds cells run with different {', '.join(changed)}; "
            "use a new --out folder"
        )


# ------------------------------------------------------------------------------------ cells


def _release(cfg, out, task, seed, kind: str, eps: float | None = None) -> Path:
    """A release shared by the cells of (task, seed): default, paper, dp or noise."""
    name = kind if eps is None else f"{kind}_eps{eps:g}"
    path = out / "releases" / task / f"seed{seed}" / name
    if (path / "release.json").exists():
        return path
    rc = dict(task=task, model=cfg.model, n_per_class=cfg.n_per_class, seed=seed,
              data_dir=cfg.data_dir)  # fmt: skip
    if kind == "paper":
        rc["preset"] = "paper"
    if kind in ("dp", "noise"):
        rc.update(epsilon=eps, delta=cfg.dp_delta, clip=cfg.dp_clip)
        rc["target"] = "noise" if kind == "noise" else "real"
        # A simulation on public data: seeded noise so that the table reproduces (recorded as
        # seeded: no guarantee). A real private release draws from the OS CSPRNG (the default).
        rc["noise_seed"] = simulation_noise_seed(task, seed, name)
    release_targets(ReleaseConfig(**rc), path)
    return path


def simulation_noise_seed(task: str, seed: int, release_name: str) -> int:
    """128-bit noise seed of one simulated release: distinct releases get independent streams."""
    digest = hashlib.sha256(f"gradmm-experiment/{task}/{seed}/{release_name}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


def _synthetic(cfg, out, task, method, seed, eps, release: Path, **extra) -> Path:
    run = cell_dir(out, task, method, seed, eps) / "run"
    if not (run / "synthetic.jsonl").exists():
        options = {**cfg.generate, "per_class": cfg.synthetic_per_class, "seed": seed, **extra}
        generate(release, run, resolve_config(options), progress=False)
    if not (run / "filtered.jsonl").exists():
        filter_run(run, FilterConfig(**cfg.filter))
    return run / "filtered.jsonl"


def _finetune(cfg, task, seed, train: Path, samples: bool = True) -> dict:
    """Fine-tune on ``train`` and describe the training texts: the median of their perplexities
    under the experiment's model (the same scoring for every method) and, when ``samples``
    (never for real text), the first three texts of each class."""
    ft = FinetuneConfig(**{**cfg.finetune, "model": cfg.model, "task": task, "train": str(train),
                           "data_dir": cfg.data_dir, "seed": seed})  # fmt: skip
    result = finetune(ft, progress=False)
    keep = ("test_accuracy", "dev_accuracy", "selected_step", "train_examples",
            "test_per_class_accuracy", "train_loss")  # fmt: skip
    out = {k: result[k] for k in keep}
    rows = read_jsonl(train)
    out["train_perplexity"] = round(statistics.median(
        text_perplexities(load_model(cfg.model), [r["text"] for r in rows])), 2)  # fmt: skip
    if samples:
        names = load_task(task).label_names
        out["samples"] = {
            name: [r["text"] for r in rows if r["label"] == c][:3] for c, name in enumerate(names)
        }
    return out


def run_cell(cfg, out, task_name, method, seed, eps) -> dict:
    task = load_task(task_name)
    if method in ("zero_shot", "few_shot"):
        lm = load_model(cfg.model)
        prompt = tokenize_prompt(task, lm.tokenizer)
        max_test = cfg.finetune.get("max_test")
        dev, test = eval_sets(task, cfg.data_dir, max_test, seed)
        k = cfg.few_shot_k if method == "few_shot" else 0
        res = accuracy(lm, prompt, test, task.label_names, demonstrations(lm, prompt, dev, k, seed))
        return {"test_accuracy": res["accuracy"], "test_per_class_accuracy":
                res["per_class_accuracy"], "dev_accuracy": None}  # fmt: skip
    if method in ("real_private", "real_random"):
        with tempfile.TemporaryDirectory() as tmp:  # real text never lands under OUT
            train = Path(tmp) / "train.jsonl"
            write_jsonl(train, real_training_rows(cfg, task, seed, method))
            return _finetune(cfg, task_name, seed, train, samples=False)
    if method == "lm_prompted":
        run = cell_dir(out, task_name, method, seed, eps)
        train = run / "synthetic.jsonl"
        if not train.exists():
            write_jsonl(train, lm_prompted_examples(cfg.model, task, cfg.synthetic_per_class, seed))
        return _finetune(cfg, task_name, seed, train)
    if method == "gradmm_paper":
        rel = _release(cfg, out, task_name, seed, "paper")
        train = _synthetic(cfg, out, task_name, method, seed, eps, rel, preset="paper")
    elif method == "gradmm":
        rel = _release(cfg, out, task_name, seed, "default")
        train = _synthetic(cfg, out, task_name, method, seed, eps, rel)
    elif method == "dp_gradmm":
        rel = _release(cfg, out, task_name, seed, "dp", eps)
        train = _synthetic(cfg, out, task_name, method, seed, eps, rel)
    elif method == "dp_noise":
        rel = _release(cfg, out, task_name, seed, "noise", eps)
        train = _synthetic(cfg, out, task_name, method, seed, eps, rel)
    else:  # dp_none: no matching, so any DP release serves; the first ε's
        rel = _release(cfg, out, task_name, seed, "dp", cfg.dp_epsilons[0])
        train = _synthetic(cfg, out, task_name, method, seed, eps, rel, target="none")
    result = _finetune(cfg, task_name, seed, train)
    manifest = read_json(train.parent / "manifest.json")
    result["mean_rec_loss"] = manifest["mean_rec_loss"]
    result["privacy"] = load_release(rel).meta.mechanism.model_dump(mode="json")
    return result


def real_training_rows(cfg, task, seed: int, method: str) -> list[dict]:
    """The real training set of ``real_private`` (this seed's pool) or ``real_random``."""
    if method == "real_private":  # exactly the pool of this seed's release
        n, pool_seed = cfg.n_per_class, seed
    else:
        n, pool_seed = cfg.synthetic_per_class, seed + 10_000
    examples, picked = private_pool(task, task.private_split, n, pool_seed, cfg.data_dir)
    return [{"text": examples.texts[i], "label": c} for c, ix in enumerate(picked) for i in ix]


@torch.no_grad()
def lm_prompted_examples(model: str, task, per_class: int, seed: int) -> list[dict]:
    """Label-conditioned sampling: public demonstrations of one class, then a new example."""
    lm = load_model(model)
    prompt = tokenize_prompt(task, lm.tokenizer)
    newline = encode_text(lm.tokenizer, "\n")
    tail = lm.tokenizer.decode(prompt.tail).strip()
    torch.manual_seed(seed)
    rows = []
    for c in range(task.num_classes):
        demos = [t for t, y in task.require_demonstrations("the lm_prompted baseline") if y == c]
        ids = []
        for text in demos:
            ids += prompt.encode(lm.tokenizer, text) + [prompt.label_ids[c]] + newline
        got, attempts = [], 0
        while len(got) < per_class and attempts < 20:
            attempts += 1
            batch = torch.tensor([ids]).repeat(per_class, 1)
            gen = lm.model.generate(
                batch, attention_mask=torch.ones_like(batch), max_new_tokens=40,
                do_sample=True, top_k=50, temperature=0.9,
                pad_token_id=lm.tokenizer.eos_token_id,
            )  # fmt: skip
            for seq in gen[:, len(ids) :]:
                text = lm.tokenizer.decode(seq, skip_special_tokens=True).split("\n")[0]
                text = text.split(tail)[0].strip() if tail else text.strip()
                if text and len(got) < per_class:
                    got.append(text)
        rows += [{"text": t, "label": c, "label_name": task.label_names[c]} for t in got]
    return rows


# ---------------------------------------------------------------------------------- reports


def method_label(row: dict) -> str:
    return row["method"] if row["epsilon"] is None else f"{row['method']}@eps{row['epsilon']:g}"


# Baselines each synthetic-data method is compared with, paired by task and seed; a DP method
# meets the controls of its own epsilon.
COMPARISONS = {
    "gradmm": ("zero_shot", "lm_prompted", "real_private"),
    "gradmm_paper": ("zero_shot", "lm_prompted", "real_private"),
    "dp_gradmm": ("zero_shot", "dp_noise", "dp_none", "gradmm"),
}


def write_tables(rows: list[dict], out: Path) -> None:
    """Write ``results.csv`` (one row per cell) and ``results.md`` (accuracy, training-set sizes,
    paired differences)."""
    fields = ["task", "method", "epsilon", "seed", "test_accuracy", "dev_accuracy",
              "selected_step", "train_examples", "mean_rec_loss", "train_perplexity",
              "seconds"]  # fmt: skip
    lines = [",".join(fields)]
    for r in rows:
        lines.append(",".join("" if r.get(f) is None else str(r.get(f)) for f in fields))
    write_text(out / "results.csv", "\n".join(lines) + "\n")
    n_seeds = len({r["seed"] for r in rows})
    write_text(
        out / "results.md",
        f"# Test accuracy (%), mean ± std over {n_seeds} seeds\n\nGenerated by `gradmm run`; "
        "checkpoints selected on the dev slice only.\n\n"
        + markdown_table(rows, _accuracy_cell)
        + "\n\n## Training examples (mean over seeds) · seeds whose dev slice kept step 0\n\n"
        "Step 0 is the model before fine-tuning: no checkpoint beat it on dev, so the method "
        "scores as zero-shot.\n\n"
        + markdown_table([r for r in rows if r.get("train_examples") is not None], _size_cell)
        + "\n\n## Paired differences (accuracy points), mean ± std over seeds (seeds won)\n\n"
        "Each difference is taken on the same task and seed; a tie wins for neither.\n\n"
        + comparison_table(rows)
        + "\n"
        + texts_section(rows)
        + (PRIVACY_NOTE if any(r.get("epsilon") is not None for r in rows) else ""),
    )


def texts_section(rows: list[dict]) -> str:
    """What the training texts look like: their perplexity under the experiment's model (median
    per training set, mean over seeds; the same scoring for real and synthetic text) and three
    texts per class of each synthetic method (first seed; real text is never shown)."""
    scored = [r for r in rows if r.get("train_perplexity") is not None]
    if not scored:
        return ""

    def cell(group: list[dict]) -> str:
        return f"{statistics.mean(r['train_perplexity'] for r in group):.1f}"

    lines = [
        "",
        "## Training texts: perplexity under the model (median per set, mean over seeds)",
        "",
        "Each text scored alone after one BOS token, for every method alike.",
        "",
        markdown_table(scored, cell),
        "",
        "## Sample training texts (first seed)",
        "",
    ]
    first = min(r["seed"] for r in rows)
    for r in rows:
        if r["seed"] == first and r.get("samples"):
            lines.append(f"**{r['task']} / {method_label(r)}**")
            lines.append("")
            for label, texts in r["samples"].items():
                lines += [f"- {label}: " + " · ".join(f"`{t}`" for t in texts)]
            lines.append("")
    return "\n".join(lines) + "\n"


PRIVACY_NOTE = (
    "\n## What the DP rows are\n\n"
    "Each `@eps` row is a separate simulation of one release at that ε, with seeded noise "
    "(recorded in the release; no guarantee). The same private pool is also released without DP "
    "and used as `real_private` training data, so the experiment as a whole protects nothing: "
    "the rows say what each ε alone would give, not a composed guarantee. Checkpoint selection "
    "reads the dev slice of the private split, outside any release (docs/privacy.md).\n"
)


def markdown_table(rows: list[dict], cell) -> str:
    """Methods x tasks; ``cell(rows of one method and task) -> str``."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in dict.fromkeys(method_label(r) for r in rows):
        group = [[r for r in rows if r["task"] == t and method_label(r) == m] for t in tasks]
        table.append(f"| {m} | " + " | ".join(cell(g) if g else "" for g in group) + " |")
    return "\n".join(table)


def _accuracy_cell(rows: list[dict]) -> str:
    accs = [100 * r["test_accuracy"] for r in rows]
    return f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.1f}"


def _size_cell(rows: list[dict]) -> str:
    step0 = sum(r["selected_step"] == 0 for r in rows)
    return f"{statistics.mean(r['train_examples'] for r in rows):.1f} · {step0}/{len(rows)}"


def comparison_table(rows: list[dict]) -> str:
    """One row per (method, baseline) in :data:`COMPARISONS` with both present."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    acc = {(r["task"], method_label(r), r["seed"]): r["test_accuracy"] for r in rows}
    table = ["| method − baseline | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in dict.fromkeys(method_label(r) for r in rows):
        method, _, eps = m.partition("@")
        for base in COMPARISONS.get(method, ()):
            if base == "dp_noise" and eps:
                base = f"{base}@{eps}"
            cells_ = []
            for t in tasks:
                diffs = [100 * (a - acc[(t, base, s)]) for (t_, m_, s), a in acc.items()
                         if t_ == t and m_ == m and (t, base, s) in acc]  # fmt: skip
                if not diffs:
                    cells_.append("")
                    continue
                sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                won = sum(d > 0 for d in diffs)
                cells_.append(f"{statistics.mean(diffs):+.1f} ± {sd:.1f} ({won}/{len(diffs)})")
            if any(cells_):
                table.append(f"| {m} − {base} | " + " | ".join(cells_) + " |")
    return "\n".join(table)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(methods) * len(tasks)), 4))
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats at 10
    for j, m in enumerate(methods):
        means, sds = [], []
        for t in tasks:
            accs = [r["test_accuracy"] for r in rows if r["task"] == t and method_label(r) == m]
            means.append(np.mean(accs) if accs else np.nan)
            sds.append(np.std(accs, ddof=1) if len(accs) > 1 else 0)  # as in results.md
        ax.bar(np.arange(len(tasks)) + j * width, means, width, yerr=sds, label=m,
               color=colors[j % len(colors)])  # fmt: skip
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("train_loss") and r["seed"] == rows[0]["seed"]:
            ax.plot(r["train_loss"], label=f"{r['task']}/{method_label(r)}", lw=0.8)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    pts = [(r["mean_rec_loss"], r["test_accuracy"], method_label(r)) for r in rows
           if r.get("mean_rec_loss") is not None]  # fmt: skip
    for m in dict.fromkeys(p[2] for p in pts):
        xs = [p[0] for p in pts if p[2] == m]
        ax.scatter(xs, [p[1] for p in pts if p[2] == m], label=m, s=12)
    ax.set_xlabel("mean matching loss of the synthetic set")
    ax.set_ylabel("test accuracy")
    if pts:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "matching_vs_accuracy.png", dpi=120)
    plt.close(fig)
