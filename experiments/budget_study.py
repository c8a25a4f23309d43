"""What budget buys what: CPU seconds per example against the quality of the set and dev accuracy.

    GRADMM_DATA_DIR=../shared/data python experiments/budget_study.py \
        --config experiments/cpu-smollm2.yaml --out experiments/results/budget-smollm2

SST-2, seed 0, both classes, the default release of the experiment's pool (25 per class), the
experiment's generate settings as the base (its "grid budget"). Each row makes a training set of
``PER_CLASS`` texts per class (the authors' full settings: one batch of 10 per class), timed
alone (model loading excluded), then measures it (``gradmm.stages.quality``: matching loss in
batches of 10, median perplexity, label fidelity by the judge, distinct-2) and fine-tunes the
model on it unfiltered with the experiment's settings (dev accuracy selects the step; test
accuracy is recorded, never used to choose). Rows:

* ``random_x1``, ``random_x3``, ``random_x10``: random init at the grid budget and at 3x and 10x
  its steps T and initial candidates K;
* ``paper_full``: the authors' settings (paper preset and release, T = 30, I = 50, K = 500,
  k = 200), one batch of 10 per class;
* ``lm_T0`` .. ``lm_T10``: ``--init lm`` (best of 4 sampled batches), T outer steps;
* ``select_M100`` .. ``select_M1600``: ``gradmm select`` from M sampled texts per class;
* ``lm_prompted``: the LM's class-conditional samples, the cost ratio's denominator;
* ``real_pool``: the release's private pool itself (quality and fine-tuning; no cost).

Resumable: each finished row is ``OUT/rows/ROW/row.json`` (commit them); a row's generated set
stays in ``OUT/rows/ROW/run/`` and is reused. ``--rows`` runs some rows only; ``--report``
writes ``OUT/budget.md`` and ``OUT/budget.png`` from the finished rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gradmm.core.lm import place
from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import load_task
from gradmm.experiments import methods
from gradmm.experiments import runner as experiment
from gradmm.files import read_json, read_jsonl, write_json, write_jsonl, write_text
from gradmm.models.loading import load_model
from gradmm.options import build_config
from gradmm.stages.configs import GenerateConfig, SelectConfig
from gradmm.stages.generate import generate
from gradmm.stages.release import pool_rows
from gradmm.stages.sampling import lm_prompted_examples
from gradmm.stages.selection import select_texts

TASK, SEED, PER_CLASS = "sst2", 0, 20
PAPER_FULL = {"preset": "paper", "steps": 30, "inner_steps": 50, "init_candidates": 500}
LM_INIT = {"init": "lm", "init_candidates": 4}
# row -> (kind, options); kind: generate (options over the experiment's), select, lm_prompted
ROWS: dict[str, tuple[str, dict]] = {
    "lm_prompted": ("lm_prompted", {}),
    "lm_T0": ("generate", {**LM_INIT, "steps": 0}),
    "lm_T1": ("generate", {**LM_INIT, "steps": 1}),
    "select_M100": ("select", {"pool": 100}),
    "lm_T3": ("generate", {**LM_INIT, "steps": 3}),
    "random_x1": ("generate", {}),
    "select_M400": ("select", {"pool": 400}),
    "lm_T10": ("generate", {**LM_INIT, "steps": 10}),
    "random_x3": ("generate", {"scale": 3}),
    "select_M1600": ("select", {"pool": 1600}),
    "random_x10": ("generate", {"scale": 10}),
    "paper_full": ("generate", {**PAPER_FULL, "per_class": 10}),
    # the reference the goal's perplexity is set by: the private pool itself (never under OUT)
    "real_pool": ("real", {}),
}


def generate_options(cfg, options: dict) -> dict:
    """The experiment's generate settings with a row's changes (``scale``: T and K times it)."""
    base = {**cfg.generate, "per_class": PER_CLASS, "seed": SEED}
    options = dict(options)
    scale = options.pop("scale", 1)
    base["steps"] = base.get("steps", 30) * scale
    base["init_candidates"] = (base.get("init_candidates") or 500) * scale
    if options.get("preset") == "paper":  # the authors' settings: drop the grid's reductions
        base = {k: v for k, v in base.items() if k in ("batch", "length", "topk", "seed")}
    return {**base, **options}


def make_set(cfg, out: Path, row: str) -> tuple[Path, float, Path | None]:
    """(the row's training set, its generation seconds without model loading, its release)."""
    kind, options = ROWS[row]
    folder = out / "rows" / row
    run = folder / "run"
    paper = options.get("preset") == "paper"
    release = methods.shared_release(cfg, out, TASK, SEED, "paper" if paper else "default")
    if kind == "lm_prompted":
        train = run / "synthetic.jsonl"
        if not train.exists():
            task = load_task(TASK)
            lm = place(load_model(cfg.model), cfg.runtime)
            prompt = tokenize_prompt(task, lm.tokenizer)
            started = time.perf_counter()
            rows = lm_prompted_examples(lm, task, prompt, PER_CLASS, SEED)
            seconds = time.perf_counter() - started
            write_json(folder / "timing.json", {"sample": seconds})
            write_jsonl(train, rows)
        return train, read_json(folder / "timing.json")["sample"], release
    if not (run / "synthetic.jsonl").exists():
        if kind == "select":
            config = build_config(SelectConfig, {**options, "per_class": PER_CLASS, "seed": SEED})
            select_texts(release, run, config, progress=True, runtime=cfg.runtime)
        else:
            config = build_config(GenerateConfig, generate_options(cfg, options))
            generate(release, run, config, progress=True, runtime=cfg.runtime)
    timings = read_json(run / "manifest.json")["timings_s"]
    return run / "synthetic.jsonl", timings["total"] - timings["load"], release


def run_row(cfg, out: Path, row: str) -> dict:
    if ROWS[row][0] == "real":
        return real_pool_row(cfg, out)
    train, seconds, release = make_set(cfg, out, row)
    tuned = methods.train_and_describe(cfg, TASK, SEED, train, release)
    examples = len(read_jsonl(train))
    return {
        "row": row,
        "kind": ROWS[row][0],
        "options": ROWS[row][1],
        "examples": examples,
        "seconds": round(seconds, 2),
        "seconds_per_example": round(seconds / examples, 3),
        "quality": tuned.quality,
        "dev_accuracy": tuned.dev_accuracy,
        "test_accuracy": tuned.test_accuracy,
        "selected_step": tuned.selected_step,
        "dev_curve": tuned.dev_curve,
        "samples": tuned.samples,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def real_pool_row(cfg, out: Path) -> dict:
    """The private pool of the release (25 per class): its quality and fine-tuning, no cost."""
    release = methods.shared_release(cfg, out, TASK, SEED, "default")
    with tempfile.TemporaryDirectory() as tmp:  # real text never lands under OUT
        train = Path(tmp) / "train.jsonl"
        write_jsonl(train, pool_rows(load_task(TASK), cfg.n_per_class, SEED, cfg.data_dir))
        tuned = methods.train_and_describe(cfg, TASK, SEED, train, release, samples=False)
    return {
        "row": "real_pool",
        "kind": "real",
        "options": {},
        "examples": tuned.train_examples,
        "seconds": None,
        "seconds_per_example": None,
        "quality": tuned.quality,
        "dev_accuracy": tuned.dev_accuracy,
        "test_accuracy": tuned.test_accuracy,
        "selected_step": tuned.selected_step,
        "dev_curve": tuned.dev_curve,
        "samples": None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def report(out: Path) -> str:
    """The table of finished rows (markdown), cost ratios against ``lm_prompted``."""
    done = {r: v for r, v in ((r, out / "rows" / r / "row.json") for r in ROWS) if v.exists()}
    rows = {r: read_json(p) for r, p in done.items()}
    base = rows.get("lm_prompted", {}).get("seconds_per_example")
    lines = [
        "| row | examples | s / example | x lm_prompted | matching loss | median ppl | "
        "label fidelity | distinct-2 | dev acc (step) | dev acc, last step | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, v in rows.items():
        q, cost = v["quality"], v["seconds_per_example"]
        ratio = f"{cost / base:.1f}" if base and cost is not None else "-"
        cost = "-" if cost is None else f"{cost:.2f}"
        lines.append(
            f"| {r} | {v['examples']} | {cost} | {ratio} | "
            f"{q['matching_loss']:.4f} | {q['median_perplexity']:.1f} | "
            f"{q['label_fidelity']:.2f} | {q['distinct_2']:.2f} | "
            f"{100 * v['dev_accuracy']:.1f} ({v['selected_step']}) | "
            f"{100 * v['dev_curve'][-1]['accuracy']:.1f} | {100 * v['test_accuracy']:.1f} |"
        )
    judge = next(iter(rows.values()))["quality"] if rows else None
    if judge:
        lines.append(
            f"\nJudge: TF-IDF logistic regression on {judge['judge_train_rows']} judge-slice rows, "
            f"test accuracy {judge['judge_test_accuracy']:.3f}."
        )
    return "\n".join(lines) + "\n"


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [read_json(p) for r in ROWS if (p := out / "rows" / r / "row.json").exists()]
    metrics = [
        ("matching_loss", "matching loss"),
        ("median_perplexity", "median perplexity"),
        ("label_fidelity", "label fidelity"),
        ("dev_accuracy", "dev accuracy"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for v in rows:
            if v["seconds_per_example"] is None:  # the real pool: a line, it has no cost
                y = v["quality"][key] if key in v["quality"] else v[key]
                ax.axhline(y, color="grey", linestyle="--", label="real pool")
                continue
            y = v["quality"][key] if key in v["quality"] else v[key]
            ax.scatter(v["seconds_per_example"], y)
            ax.annotate(v["row"], (v["seconds_per_example"], y), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("CPU seconds per example")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--report", action="store_true", help="only write the table and plot")
    args = parser.parse_args(argv)
    cfg = experiment.load_experiment(args.config)
    if not args.report:
        for row in args.rows:
            path = args.out / "rows" / row / "row.json"
            if path.exists():
                continue
            print(f"budget study: {row}", file=sys.stderr, flush=True)
            result = run_row(cfg, args.out, row)
            result["command"] = " ".join(["python", "experiments/budget_study.py", *sys.argv[1:]])
            write_json(path, result)
    table = report(args.out)
    header = (
        f"# Budget study: {TASK}, seed {SEED}, {cfg.model}\n\nGenerated by `python "
        "experiments/budget_study.py` (each row's command and machine are in its row.json); do "
        "not edit. Seconds: making the set alone on the machine, model loading excluded; "
        "accuracies in %, dev-selected step in brackets.\n\n"
    )
    write_text(args.out / "budget.md", header + table)
    plot(args.out)
    print(table)


if __name__ == "__main__":
    main()
