"""How much of the label does each released target carry? Label separation on real text.

    python experiments/label_separation.py --model smollm2-135m --task sst2 \
        --data-dir ../shared/data --out experiments/results/label-separation/sst2.json

For every target a release offers (output layer, label rows, a 32 x 32 sketch, the last decoder
block), one non-DP release of 25 examples per class (seed 0, as the grids), then batches of B = 10
real training texts that no release reads (outside the pool and the dev slice), scored as class c
against class c's target by the matching loss (1 − cos of the batch's mean gradient and the
target, each matched parameter's cosine averaged, as the solver does):

* ``same``: batches of class-c texts, scored as c;
* ``other``: batches of texts of another class, scored as c (assigned c's label word).

Label separation is ``median(other) − median(same)``, and ``auc`` the fraction of (other, same)
pairs where the other-class batch matches worse: 0.5 means the target does not tell a text that
supports its label from one that contradicts it; 1.0 means it always does. Resumable per target.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from gradmm.core.gradients import example_gradients, summed_autograd_grads, summed_grads
from gradmm.core.lm import matched_parameters
from gradmm.core.tokens import LabelTokens
from gradmm.files import read_json, write_json, write_text
from gradmm.models.loading import load_model
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.record import Release
from gradmm.stages.release import release_targets, rows_outside_pool

TARGETS = {
    "output": {"match_params": "output"},
    "label-rows": {"match_params": "label-rows"},
    "sketch-32": {"match_params": "sketch", "sketch_dim": 32},
    "last-block": {"match_params": "last-block"},
}


def batch_gradient(lm, release: Release, params, seqs: list[list[int]], c: int) -> dict:
    """Mean gradient of ``seqs`` all labelled ``c``, in the release's parameters and space."""
    prompt = release.prompt
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    classes = [c] * len(seqs)
    if release.meta.match_params == "last-block":
        sums = summed_autograd_grads(lm, params, seqs, classes, labels)
    else:
        space = release.space
        r, h, weights = example_gradients(lm, seqs, classes, labels)
        names = [release.meta.output_params.weight, release.meta.output_params.bias]
        sums = dict(zip(names, summed_grads(space.map_r(r), space.map_h(h), weights), strict=False))
        sums = {name: g for name, g in sums.items() if name is not None}
    return {name: g / len(seqs) for name, g in sums.items()}


def matching_loss(release: Release, grads: dict, c: int) -> float:
    """1 − the mean over matched parameters of cos(gradient, class ``c``'s target)."""
    cos = [
        torch.nn.functional.cosine_similarity(
            g.flatten().double(), release.targets[name][c].flatten().double(), dim=0
        )
        for name, g in grads.items()
    ]
    return float(1 - torch.stack(cos).mean())


def measure_target(lm, model: str, task: str, data_dir: str, options: dict, args) -> dict:
    config = ReleaseConfig(
        model=model, task=task, n_per_class=args.n_per_class, seed=0, data_dir=data_dir, **options
    )
    with tempfile.TemporaryDirectory() as tmp:
        release = release_targets(config, Path(tmp) / "release")
    examples, unread = rows_outside_pool(config, release.task, release.meta.split)
    rng = np.random.default_rng(args.seed)
    classes = range(release.task.num_classes)
    by_class = {c: [i for i in unread if examples.labels[i] == c] for c in classes}
    batches = {
        c: [rng.choice(by_class[c], args.batch, replace=False) for _ in range(args.batches)]
        for c in classes
    }
    params = matched_parameters(lm.model, release.meta.match_params)
    prompt = release.prompt
    scores = {"same": [], "other": []}
    for c in classes:
        for d in classes:
            for ix in batches[d]:
                seqs = [prompt.encode(lm.tokenizer, examples.texts[i]) for i in ix]
                rec = matching_loss(release, batch_gradient(lm, release, params, seqs, c), c)
                scores["same" if d == c else "other"].append(rec)
    same, other = scores["same"], scores["other"]
    auc = float(np.mean([o > s for o in other for s in same]))
    return {
        "release": options,
        "same": [round(x, 5) for x in same],
        "other": [round(x, 5) for x in other],
        "median_same": statistics.median(same),
        "median_other": statistics.median(other),
        "separation": statistics.median(other) - statistics.median(same),
        "auc": auc,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-per-class", type=int, default=25)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--batches", type=int, default=8, help="real batches per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches' draw")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args(argv)
    result = read_json(args.out) if args.out.exists() else {"targets": {}}
    lm = load_model(args.model)
    for name in args.targets:
        if name in result["targets"]:
            continue
        print(f"{name} ...", file=sys.stderr)
        result["targets"][name] = measure_target(
            lm, args.model, args.task, args.data_dir, TARGETS[name], args
        )
        result.update(
            model=args.model,
            task=args.task,
            n_per_class=args.n_per_class,
            batch=args.batch,
            batches_per_class=args.batches,
            machine=platform.platform(),
            command=" ".join(["python", "experiments/label_separation.py", *sys.argv[1:]]),
            updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    table = [
        f"# Label separation: {result['task']}, {result['model']}",
        "",
        f"Generated by `{result['command']}` on {result['machine']}; do not edit. Batches of "
        f"{result['batch']} real texts no release reads, {result['batches_per_class']} per class; "
        "matching loss (1 − cos) against one non-DP release of "
        f"{result['n_per_class']} per class.",
        "",
        "| target | median same class | median other class | separation | AUC |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["targets"].items():
        table.append(
            f"| {name} | {r['median_same']:.4f} | {r['median_other']:.4f} | "
            f"{r['separation']:+.4f} | {r['auc']:.2f} |"
        )
    write_text(args.out.with_suffix(".md"), "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
