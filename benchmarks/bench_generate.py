"""Fast vs reference engine on the paper's per-problem settings; writes
benchmarks/results/generate.{json,md}.

    python benchmarks/bench_generate.py --model reference --data-dir ../shared/data

One release (sst2, 25 real examples per class), then ``gradmm generate`` with each engine in its
own process (so that peak RSS is that engine's): B=10, T=30, I=50, k=200, K=500, 2 classes x 2
problems, seed 0. Reported per engine: seconds per synthetic example, the time split by stage,
peak RSS and the final matching losses; and the reference/fast ratio.
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


def child(args: argparse.Namespace) -> None:
    """Run one engine in this process and print its figures as JSON."""
    from gradmm.generate import generate, resolve_config

    cfg = resolve_config(
        {
            "engine": args.child,
            "per_class": args.problems_per_class * args.batch,
            "batch": args.batch,
            "steps": args.steps,
            "inner_steps": args.inner_steps,
            "topk": args.topk,
            "init_candidates": args.init_candidates,
            "length": args.length,
            "seed": 0,
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
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--engines", nargs="+", default=["fast", "reference"])
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

    from gradmm.release import ReleaseConfig, release_targets

    command = " ".join(["python", "benchmarks/bench_generate.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as work:
        release = Path(work) / "release"
        release_targets(
            ReleaseConfig(task="sst2", model=args.model, n_per_class=25, data_dir=args.data_dir),
            release,
        )
        engines = {}
        for engine in args.engines:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", engine,
                   "--release", str(release), "--workdir", work]  # fmt: skip
            print(f"running {engine} engine ...", file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            engines[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
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
        },  # fmt: skip
        "engines": engines,
    }
    if {"fast", "reference"} <= engines.keys():
        fast, ref = engines["fast"], engines["reference"]
        results["speedup_per_example"] = round(
            ref["seconds_per_example"] / fast["seconds_per_example"], 2
        )
        results["target"] = {
            "speedup_at_least_10x": results["speedup_per_example"] >= 10,
            "mean_rec_not_higher": fast["mean_final_rec"] <= ref["mean_final_rec"],
            "peak_rss_not_higher": fast["peak_rss_mib"] <= ref["peak_rss_mib"],
        }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    stages = sorted({k for e in r["engines"].values() for k in e["timings_s"]})
    head = "| | " + " | ".join(r["engines"]) + " |\n|---|" + "---|" * len(r["engines"])
    rows = [
        ("seconds per synthetic example (excl. model load)", "seconds_per_example"),
        ("wall seconds", "wall_seconds"),
        ("peak RSS (MiB)", "peak_rss_mib"),
        ("mean final rec_loss", "mean_final_rec"),
    ]
    lines = [head]
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(str(e[key]) for e in r["engines"].values()) + " |"
        )
    for stage in stages:
        vals = [str(e["timings_s"].get(stage, "-")) for e in r["engines"].values()]
        lines.append(f"| time in {stage} (s) | " + " | ".join(vals) + " |")
    summary = ""
    if "speedup_per_example" in r:
        summary = (
            f"\n**Speedup per synthetic example: {r['speedup_per_example']}x** — "
            + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["target"].items())
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
