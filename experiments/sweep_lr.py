"""Choose the fine-tuning learning rate of an experiment on dev only; writes a JSON of the curves.

    python experiments/sweep_lr.py --config experiments/cpu-small.yaml --data-dir ../shared/data

Fine-tunes on the ``real_random`` training set of one (task, seed) of the experiment (real
examples of the private split outside the pool and the dev slice) at each learning rate, with
the experiment's other fine-tuning settings, and records dev accuracy at every checkpoint. The
learning rate with the best dev accuracy is the one to put in the experiment file. Test accuracy
is not recorded here, so it cannot influence the choice. The file is written after every
learning rate, and a rerun with the same settings skips those already done.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from gradmm.data.tasks import load_task
from gradmm.experiments import methods
from gradmm.experiments import runner as experiment
from gradmm.files import read_json, write_json, write_jsonl
from gradmm.stages.configs import FinetuneConfig
from gradmm.stages.finetune import finetune


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every dev-only sweep takes: the experiment, the data, one (task, seed)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main() -> None:
    ap = sweep_parser(__doc__)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lr_sweep.json"))
    args = ap.parse_args()
    cfg = experiment.load_experiment(Path(args.config))
    cfg.data_dir = args.data_dir
    rows = methods.real_training_rows(cfg, load_task(args.task), args.seed, "real_random")
    out = Path(args.out)
    # resumable: learning rates already in the file (same task, seed, settings) are kept
    previous = read_json(out) if out.exists() else {}
    same = {k: previous.get(k) for k in ("task", "seed", "finetune")} == {
        "task": args.task,
        "seed": args.seed,
        "finetune": cfg.finetune,
    }
    curves = previous.get("curves", {}) if same else {}
    with tempfile.TemporaryDirectory() as tmp:  # real text never lands in the repo
        train = Path(tmp) / "train.jsonl"
        write_jsonl(train, rows)
        for lr in args.lrs:
            if f"{lr:g}" in curves:
                continue
            ft = FinetuneConfig(
                **{
                    **cfg.finetune,
                    "model": cfg.model,
                    "task": args.task,
                    "train": str(train),
                    "data_dir": args.data_dir,
                    "seed": args.seed,
                    "lr": lr,
                }
            )
            started = time.perf_counter()
            result = finetune(ft, progress=False)
            curves[f"{lr:g}"] = {
                "dev_accuracy": {h["step"]: h["dev"]["accuracy"] for h in result["history"]},
                "best_dev_accuracy": result["dev_accuracy"],
                "train_loss": result["train_loss"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"lr {lr:g}: best dev accuracy {result['dev_accuracy']:.3f}", flush=True)
            write_json(  # after every learning rate: an interrupted sweep resumes
                out,
                {
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "task": args.task,
                    "seed": args.seed,
                    "train_examples": len(rows),
                    "finetune": cfg.finetune,
                    "best_lr": max(curves, key=lambda k: curves[k]["best_dev_accuracy"]),
                    "curves": curves,
                },
            )


if __name__ == "__main__":
    main()
