"""Try GRADMM's knobs on dev only; writes a JSON of dev accuracy, perplexity and matching loss.

    python experiments/sweep_gradmm.py --config experiments/cpu-smollm2.yaml \
        --data-dir ../shared/data --out experiments/results/cpu-smollm2-dev/gradmm_sweep_sst2.json

For one (task, seed) of the experiment, each variant changes one of the knobs the paper says
matter (ρ, the projection's candidate count k, the number of ADMM steps, the projection's LM
prefix, the projection order) from the experiment's ``generate`` settings, or the filter's
few-shot classifier, then runs the
``gradmm`` method's stages: release (shared), generate, filter, LoRA fine-tuning with the
experiment's settings. A ``select_*`` variant runs the ``lm_selected`` method's instead
(``gradmm select``, unfiltered) with one floor on the texts it may select.
It records the best dev accuracy, the filtered set's size, its texts'
perplexity under the model and the mean matching loss. Test accuracy is not recorded, so it
cannot influence the choice. The file is written after every variant, and a rerun with the same
settings skips those already done; the generated sets stay in ``--work`` (not committed).
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sweep_lr import sweep_parser  # the sibling script: run as python experiments/...

from gradmm.data import paper
from gradmm.experiments import methods
from gradmm.experiments import runner as experiment
from gradmm.files import read_json, write_json, write_text
from gradmm.options import build_config
from gradmm.stages.configs import SelectConfig
from gradmm.stages.selection import select_texts

# One knob changed per variant (the experiment's generate settings are the base).
VARIANTS: dict[str, dict] = {
    "base": {},
    "rho_0.1": {"rho": 0.1},
    "rho_5": {"rho": 5.0},
    "topk_50": {"topk": 50},
    "steps_x2": {"steps": 2},  # multiplies the base's steps
    "lm_first": {"projection": "lm-first"},
    # the authors' movie-review instruction naming the label word, instead of the task's "The"
    "prefix_instruction": {"lm_prefix": paper.PAPER_LM_PREFIX["rotten_tomatoes"]},
    # the filter, not a solver knob: the base's texts without the few-shot classifier's vote
    "no_classifier": {"filter": {"classifier": False}},
    # on-topic text: LM init (best of 4 sampled batches), then what the projection's LM reads
    # (the LM prefix, the prefix as a chat turn, or the class's public demonstrations), in
    # both projection orders, and k
    "lm_init": {"init": "lm", "init_candidates": 4},
    "lm_init_chat": {"init": "lm", "init_candidates": 4, "projection_context": "chat"},
    "lm_init_chat_lm_first": {
        "init": "lm",
        "init_candidates": 4,
        "projection_context": "chat",
        "projection": "lm-first",
    },
    "lm_init_demos": {"init": "lm", "init_candidates": 4, "projection_context": "demonstrations"},
    "lm_init_demos_lm_first": {
        "init": "lm",
        "init_candidates": 4,
        "projection_context": "demonstrations",
        "projection": "lm-first",
    },
    "lm_init_demos_topk_50": {
        "init": "lm",
        "init_candidates": 4,
        "projection_context": "demonstrations",
        "topk": 50,
    },
    # gradmm select (the lm_selected method, unfiltered) from M = 100 sampled texts per class:
    # its degenerate-text floor (fewest words, highest perplexity a selected text may have)
    "select_words_1": {"select": {"pool": 100, "min_words": 1}},
    "select_words_4": {"select": {"pool": 100, "min_words": 4}},
    "select_words_8": {"select": {"pool": 100, "min_words": 8}},
    "select_words_4_ppl_150": {"select": {"pool": 100, "min_words": 4, "max_perplexity": 150}},
}
# run by default: the knobs of the first sweep (committed); the on-topic ones with --variants
FIRST_SWEEP = [name for name in VARIANTS if not name.startswith(("lm_init", "select"))]


def variant_options(cfg: experiment.ExperimentConfig, name: str) -> dict:
    """The generate options of variant ``name`` (its ``filter`` entry excluded), or for a
    ``select`` variant the select options."""
    if "select" in VARIANTS[name]:
        return {**cfg.select, **VARIANTS[name]["select"]}
    options = {k: v for k, v in VARIANTS[name].items() if k != "filter"}
    if "steps" in options:
        options["steps"] = options["steps"] * cfg.generate.get("steps", 30)
    return options


def variant_cell(cfg, work: Path, task: str, seed: int, name: str) -> methods.Cell:
    """The cell of variant ``name``; a filter-only variant starts from a copy of the base's
    generated set (the same options and seed generate the same texts)."""
    changed = VARIANTS[name].get("filter")
    if changed:
        cfg = cfg.model_copy(update={"filter": {**cfg.filter, **changed}})
    cell = methods.Cell(cfg, work, task, f"sweep_{name}", seed, None)
    base = methods.Cell(cfg, work, task, "sweep_base", seed, None).folder / "run"
    if changed and (base / "synthetic.jsonl").exists() and not (cell.folder / "run").exists():
        unfiltered = shutil.ignore_patterns("filtered.jsonl", "filter_report.json")
        shutil.copytree(base, cell.folder / "run", ignore=unfiltered)
    return cell


def main() -> None:
    ap = sweep_parser(__doc__)
    ap.add_argument("--variants", nargs="+", default=FIRST_SWEEP, choices=list(VARIANTS))
    ap.add_argument("--out", required=True, help="the JSON of results")
    ap.add_argument(
        "--work", default=None, help="folder of the generated sets [sweep_work/ next to OUT]"
    )
    args = ap.parse_args()
    cfg = experiment.load_experiment(Path(args.config))
    cfg.data_dir = args.data_dir
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "sweep_work"
    settings = {
        "task": args.task,
        "seed": args.seed,
        "model": cfg.model,
        "n_per_class": cfg.n_per_class,
        "synthetic_per_class": cfg.synthetic_per_class,
        "generate": cfg.generate,
        "filter": cfg.filter,
        "finetune": cfg.finetune,
    }
    previous = read_json(out) if out.exists() else {}
    done = previous.get("variants", {}) if previous.get("settings") == settings else {}
    release = methods.shared_release(cfg, work, args.task, args.seed, "default")
    for name in args.variants:
        if name in done:
            continue
        options = variant_options(cfg, name)
        cell = variant_cell(cfg, work, args.task, args.seed, name)
        started = time.perf_counter()
        if "select" in VARIANTS[name]:
            train = cell.folder / "run" / "synthetic.jsonl"
            if not train.exists():
                select = {**options, "per_class": cfg.synthetic_per_class, "seed": args.seed}
                config = build_config(SelectConfig, select)
                select_texts(release, train.parent, config, progress=False, runtime=cfg.runtime)
        else:
            train = methods.synthetic_set(cell, release, **options)
        result = methods.train_and_describe(cell.cfg, args.task, args.seed, train, release)
        manifest = read_json(train.parent / "manifest.json")
        done[name] = {
            "options": VARIANTS[name] if "filter" in VARIANTS[name] else options,
            "best_dev_accuracy": result.dev_accuracy,
            "selected_step": result.selected_step,
            "train_per_class": result.train_per_class,
            "train_perplexity_median": result.train_perplexity,
            "train_perplexity_mean": result.train_perplexity_mean,
            "mean_rec_loss": manifest["mean_rec_loss"],
            "label_fidelity": result.quality["label_fidelity"],
            "distinct_2": result.quality["distinct_2"],
            "samples": result.samples,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(
            f"{name}: dev {result.dev_accuracy:.3f}, ppl {result.train_perplexity}, "
            f"rec {manifest['mean_rec_loss']:.4f}",
            flush=True,
        )
        record = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": settings,
            "variants": done,
        }
        write_json(out, record)  # after every variant: an interrupted sweep resumes
        write_text(out.with_suffix(".md"), summary(record))


def summary(record: dict) -> str:
    """The sweep as a markdown table (dev accuracy only) with the first samples of each."""
    s = record["settings"]
    lines = [
        f"# GRADMM knobs on dev: {s['task']}, seed {s['seed']}, {s['model']}",
        "",
        f"Generated by `{record['command']}` on {record['date']}; do not edit. Base settings: "
        f"`{s['generate']}`, {s['synthetic_per_class']} per class before filtering. Dev "
        "accuracy of the dev-selected step (test accuracy is not recorded).",
        "",
        "| variant | changed | best dev accuracy | kept per class | perplexity median / mean "
        "| mean matching loss | label fidelity | distinct-2 | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in record["variants"].items():
        changed = ", ".join(f"{k}={str(x)[:24]}" for k, x in v["options"].items()) or "-"
        lines.append(
            f"| {name} | {changed} | {100 * v['best_dev_accuracy']:.1f} | "
            f"{v['train_per_class']} | {v['train_perplexity_median']:.1f} / "
            f"{v['train_perplexity_mean']:.1f} | {v['mean_rec_loss']:.4f} | "
            f"{_number(v.get('label_fidelity'))} | {_number(v.get('distinct_2'))} | "
            f"{v['seconds']:.0f} |"
        )
    lines += ["", "## First texts per class", ""]
    for name, v in record["variants"].items():
        for label, texts in v["samples"].items():
            lines.append(f"- {name} / {label}: " + " · ".join(f"`{t}`" for t in texts))
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"  # not measured by the first sweep


if __name__ == "__main__":
    main()
