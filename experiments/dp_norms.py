"""Signal and noise of DP releases before any generation: sizes the DP study's grid.

    python experiments/dp_norms.py --config experiments/dp-utility.yaml --data-dir ../shared/data \
        --out experiments/results/dp-utility-dev/norms.json

For every task, pool size n and released gradient of the experiment file, and every ε: the
Poisson rate q (the experiment's, n·C over the split), σ/Δ from the PLD accountant, and the norm
of the noise added to each released class mean, σ·C·√D / n (D numbers per class). Next to it the
signal: the norm of a class mean of clipped per-example gradients (mean over classes), measured
on a fixed pool of n (seed 0) released at ε = 1e9, whose noise is negligible. DP GRADMM matches
directions (cosine), so where the noise norm is many times the signal's the released direction
is noise, and where it is a small fraction the release is as good as a non-private one.
Resumable: finished (task, n, target) entries are kept.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from gradmm.data.tasks import load_task
from gradmm.experiments import methods
from gradmm.experiments import runner as experiment
from gradmm.files import read_json, write_json, write_text
from gradmm.privacy import accounting as privacy
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.release import release_targets

SIGNAL_EPSILON = 1e9  # σ/Δ ≈ 2e-5: the measured norm is the signal's
# a measurement of clipped signal, not a release anyone uses: lift gradmm's bound on ε for it
privacy.MAX_EPSILON = SIGNAL_EPSILON


def class_norms(release) -> list[float]:
    """Per class, the norm of the released (weight, bias) target, and D, numbers per class."""
    weight, bias = release.target_weight, release.target_bias
    norms = []
    for c in range(weight.shape[0]):
        squared = weight[c].pow(2).sum() + (0 if bias is None else bias[c].pow(2).sum())
        norms.append(float(squared.sqrt()))
    return norms, weight[0].numel() + (0 if bias is None else bias[0].numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the DP study's experiment file")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True, help="the JSON of results (markdown next to it)")
    args = ap.parse_args()
    cfg = experiment.load_experiment(Path(args.config))
    if not cfg.dp_pool_sizes:
        ap.error(f"{args.config} has no dp_pool_sizes: it is not a DP study")
    out = Path(args.out)
    record = read_json(out) if out.exists() else {"entries": []}
    done = {(e["task"], e["n_per_class"], e["match_params"]) for e in record["entries"]}
    for task in cfg.tasks:
        for n in cfg.dp_pool_sizes:
            rate = methods.poisson_rate(load_task(task), n, args.data_dir)
            for match in cfg.dp_match_params:
                if (task, n, match) in done:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    rel = release_targets(
                        ReleaseConfig(
                            task=task,
                            model=cfg.model,
                            n_per_class=n,
                            seed=0,
                            data_dir=args.data_dir,
                            epsilon=SIGNAL_EPSILON,
                            delta=cfg.dp_delta,
                            clip=cfg.dp_clip,
                            match_params=match,
                            noise_seed=0,
                            sketch_dim=cfg.dp_sketch_dim if match == "sketch" else None,
                        ),
                        Path(tmp) / "release",
                        runtime=cfg.runtime,
                    )
                    norms, numbers = class_norms(rel)
                entry = {
                    "task": task,
                    "n_per_class": n,
                    "match_params": match,
                    "sampling_rate": rate,
                    "numbers_per_class": numbers,
                    "signal_norm": sum(norms) / len(norms),
                    "by_epsilon": [],
                }
                for eps in cfg.dp_epsilons:
                    sigma = privacy.poisson_noise_multiplier(eps, cfg.dp_delta, rate)
                    noise = sigma * cfg.dp_clip * math.sqrt(numbers) / n
                    entry["by_epsilon"].append(
                        {"epsilon": eps, "noise_multiplier": sigma, "noise_norm": noise}
                    )
                print(entry, flush=True)
                record["entries"].append(entry)
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                record.update(command=" ".join(["python", *sys.argv]), date=now)
                write_json(out, record)  # after every entry: an interrupted run resumes
                write_text(out.with_suffix(".md"), summary(record))


def summary(record: dict) -> str:
    lines = [
        "# Signal and noise of the DP study's releases (before any generation)",
        "",
        f"Generated by `{record['command']}` on {record['date']}; do not edit. Noise: σ·C·√D/n "
        "on each released class mean (σ/Δ from the PLD accountant for the Poisson rate q); "
        "signal: the norm of a class mean of clipped gradients (C = 1), pool seed 0.",
        "",
        "| task | n per class | released gradient | D per class | q | signal norm | "
        "noise norm at ε = "
        + " / ".join(f"{e['epsilon']:g}" for e in record["entries"][0]["by_epsilon"])
        + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in record["entries"]:
        noise = " / ".join(f"{b['noise_norm']:.3g}" for b in e["by_epsilon"])
        lines.append(
            f"| {e['task']} | {e['n_per_class']} | {e['match_params']} | "
            f"{e['numbers_per_class']} | {e['sampling_rate']:.3g} | "
            f"{e['signal_norm']:.3g} | {noise} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
