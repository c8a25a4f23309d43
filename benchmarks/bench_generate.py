"""Fast vs reference engine on the paper's per-problem settings; writes
benchmarks/results/generate.{json,md}.

    python benchmarks/bench_generate.py --model reference --data-dir ../shared/data
    python benchmarks/bench_generate.py --model smollm2-135m --data-dir ../shared/data \
        --problems-per-class 1 --steps 3 --inner-steps 10 --init-candidates 20 --length 24 \
        --runs reference fast --out benchmarks/results/generate_smollm2

One release (sst2, 25 real examples per class), then ``gradmm generate`` for each run in its
own process (so that peak RSS is that run's): by default B=10, T=30, I=50, k=200, K=500, 2
classes x 2 problems, seed 0. Runs: ``reference`` (the authors' computation), ``fast`` (same
settings), ``fast-K/10`` (a tenth of the initial candidates) and ``fast-I/5-K/10`` (also a fifth
of the inner steps). Reported per run:
seconds per synthetic example, the time split by stage, peak RSS, the final matching loss and
the texts' median perplexity, and **time to quality**: the seconds (model load excluded) after
which the mean best matching loss is first within 0.1% of the reference engine's final one, read
from each run's per-iteration history (for the reference, which solves problems one after
another, the time all its problems needed to reach that iteration).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py

from gradmm.files import write_json, write_text

RESULTS = Path(__file__).parent / "results"
# run name -> generate options over the shared settings
RUNS = {
    "reference": lambda args: {"engine": "reference"},
    "fast": lambda args: {"engine": "fast"},
    "fast-K/10": lambda args: {"engine": "fast", "init_candidates": args.init_candidates // 10},
    "fast-I/5-K/10": lambda args: {
        "engine": "fast",
        "inner_steps": args.inner_steps // 5 or 1,
        "init_candidates": args.init_candidates // 10 or 1,
    },
}


def child(args: argparse.Namespace) -> None:
    """Run one engine in this process and print its figures as JSON."""
    import statistics

    from gradmm.stages.configs import GenerateConfig
    from gradmm.stages.generate import generate

    cfg = GenerateConfig(
        **{
            "per_class": args.problems_per_class * args.batch,
            "batch": args.batch,
            "steps": args.steps,
            "inner_steps": args.inner_steps,
            "topk": args.topk,
            "init_candidates": args.init_candidates,
            "length": args.length,
            "seed": 0,
            **RUNS[args.child](args),
        }
    )
    out = Path(args.workdir) / args.child
    started = time.perf_counter()
    generate(args.release, out, cfg, overwrite=True, progress=False)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()]
    recs = [r["rec_loss"] for r in rows[:: args.batch]]
    timings = manifest["timings_s"]
    compute = timings["total"] - timings["load"]  # model loading is the same for both engines
    print(
        json.dumps(
            {
                "wall_seconds": round(wall, 2),
                "seconds_per_example": round(compute / len(rows), 3),
                "examples": len(rows),
                "timings_s": manifest["timings_s"],
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "final_rec_per_problem": recs,
                "mean_final_rec": round(sum(recs) / len(recs), 6),
                "median_perplexity": round(statistics.median(r["perplexity"] for r in rows), 2),
                "history": manifest["history"][0],  # [seconds since the solve started, mean rec]
                "settings": {k: v for k, v in cfg.model_dump().items() if v is not None},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--problems-per-class", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--inner-steps", type=int, default=50)
    ap.add_argument("--topk", type=int, default=200)
    ap.add_argument("--init-candidates", type=int, default=500)
    ap.add_argument("--length", type=int, default=29, help="free tokens (32 with ' It was')")
    ap.add_argument("--out", default=str(RESULTS / "generate"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--release", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from gradmm.stages.configs import ReleaseConfig
    from gradmm.stages.release import release_targets

    command = " ".join(["python", "benchmarks/bench_generate.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as work:
        release = Path(work) / "release"
        release_targets(
            ReleaseConfig(task="sst2", model=args.model, n_per_class=25, data_dir=args.data_dir),
            release,
        )
        engines = {}
        for run in args.runs:
            cmd = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--child",
                run,
                "--release",
                str(release),
                "--workdir",
                work,
            ]
            print(f"running {run} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            engines[run] = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "model",
                "batch",
                "problems_per_class",
                "steps",
                "inner_steps",
                "topk",
                "init_candidates",
                "length",
            )
        },
        "engines": engines,
    }
    if "reference" in engines:
        ref = engines["reference"]
        for run in engines.values():
            run["time_to_quality_s"] = time_to_quality(run, ref["mean_final_rec"])
        ref_seconds = ref["time_to_quality_s"]
        for name, run in engines.items():
            if name == "reference":
                continue
            run["speedup_per_example"] = round(
                ref["seconds_per_example"] / run["seconds_per_example"], 2
            )
            reached = run["time_to_quality_s"]
            run["speedup_to_quality"] = None if reached is None else round(ref_seconds / reached, 2)
            run["target"] = {
                "time_to_quality_at_least_10x": (run["speedup_to_quality"] or 0) >= 10,
                "final_rec_not_higher": run["mean_final_rec"] <= ref["mean_final_rec"],
                "perplexity_not_higher": run["median_perplexity"] <= ref["median_perplexity"],
                "peak_rss_at_most_1.5x": run["peak_rss_mib"] <= 1.5 * ref["peak_rss_mib"],
            }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


def time_to_quality(run: dict, target: float, rtol: float = 1e-3) -> float | None:
    """Seconds (init included) after which the run's mean best rec is first within ``rtol`` of
    ``target`` or below it, from its per-iteration history: what the run would have needed with
    T stopped there (None: never). Its final selection counts at the end of the run. ``rtol``
    absorbs the engines' rounding differences (the same algorithm, different kernels)."""
    for seconds, rec in run["history"]:
        if rec <= target * (1 + rtol):
            return round(seconds, 2)
    if run["mean_final_rec"] <= target * (1 + rtol):
        return round(run["timings_s"]["total"] - run["timings_s"]["load"], 2)
    return None


def markdown(r: dict) -> str:
    stages = sorted({k for e in r["engines"].values() for k in e["timings_s"]})
    head = "| | " + " | ".join(r["engines"]) + " |\n|---|" + "---|" * len(r["engines"])
    rows = [
        ("seconds per synthetic example (excl. model load)", "seconds_per_example"),
        ("wall seconds", "wall_seconds"),
        ("peak RSS (MiB)", "peak_rss_mib"),
        ("mean final rec_loss", "mean_final_rec"),
        ("median perplexity of the texts", "median_perplexity"),
        ("seconds to the reference's final rec_loss", "time_to_quality_s"),
        ("speedup to quality (x)", "speedup_to_quality"),
        ("speedup per example (x)", "speedup_per_example"),
    ]
    lines = [head]
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(str(e.get(key, "-")) for e in r["engines"].values()) + " |"
        )
    for stage in stages:
        vals = [str(e["timings_s"].get(stage, "-")) for e in r["engines"].values()]
        lines.append(f"| time in {stage} (s) | " + " | ".join(vals) + " |")
    summary = "\n".join(
        f"* **{name}**: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in t.items())
        for name, e in r["engines"].items()
        if (t := e.get("target"))
    )
    m = r["machine"]
    return f"""# Generation benchmark

Generated by `benchmarks/bench_generate.py` on {r["date"]}; do not edit.

* Command: `{r["command"]}`
* Machine: {m["cpu"]}, {m["threads"]} threads, {m["platform"]}, torch {m["torch"]}
* Settings: {json.dumps(r["settings"])}

{chr(10).join(lines)}
{summary}
"""


if __name__ == "__main__":
    main()
