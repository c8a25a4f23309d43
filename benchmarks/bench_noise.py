"""DP noise samplers on the size of a release; writes benchmarks/results/noise.{json,md}.

    python benchmarks/bench_noise.py          # optional: pip install -c constraints.txt opendp

Compares, in seconds per coordinate and extrapolated to the ``--coordinates`` of a release
(default 3e7, about a 49k x 576 output layer plus its bias):

* gradmm's sampler (``privacy.accounting.gaussian_noise``: Box-Muller on the OS CSPRNG), timed on
  the full size;
* gradmm's exact sampler (``privacy.accounting.exact_gaussian``: OpenDP's measurement on a grid with
  no rounding penalty), timed on ``--opendp-sample`` coordinates;
* OpenDP's Gaussian measurement (``make_gaussian`` on a float vector: exact sampling), timed on
  ``--opendp-sample`` coordinates, with its default granularity and with ``k=-15``.

The figures decide up to which size gradmm samples exactly
(``gradmm.privacy.accounting.EXACT_MAX_COORDINATES``, docs/privacy.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py

from gradmm.files import write_json, write_text
from gradmm.privacy.accounting import EXACT_MAX_COORDINATES
from gradmm.privacy.noise import exact_gaussian, gaussian_noise

RESULTS = Path(__file__).parent / "results"


def time_gradmm(n: int) -> dict:
    started = time.perf_counter()
    (x,) = gaussian_noise([n], 1.0)
    seconds = time.perf_counter() - started
    return {"coordinates": n, "seconds": round(seconds, 3), "std": round(float(x.std()), 5)}


def time_exact(n: int) -> dict:
    started = time.perf_counter()
    x = exact_gaussian(np.zeros(n), 1.0, 0.25)
    seconds = time.perf_counter() - started
    return {"coordinates": n, "seconds": round(seconds, 3), "std": round(float(x.std()), 5)}


def time_opendp(n: int, k: int | None) -> dict:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=n), dp.l2_distance(T=float)
    measurement = dp.m.make_gaussian(*space, scale=1.0, k=k)
    zeros = [0.0] * n
    started = time.perf_counter()
    x = np.asarray(measurement(zeros))
    seconds = time.perf_counter() - started
    return {"coordinates": n, "k": k, "seconds": round(seconds, 3), "std": round(float(x.std()), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinates", type=int, default=30_000_000)
    parser.add_argument("--opendp-sample", type=int, default=100_000)
    parser.add_argument("--out", default=str(RESULTS / "noise"))
    args = parser.parse_args()
    from importlib.metadata import version

    opendp_version = version("opendp")
    samplers = {
        "gradmm float (Box-Muller on the OS CSPRNG)": time_gradmm(args.coordinates),
        f"gradmm exact (opendp {opendp_version}, fine grid)": time_exact(args.opendp_sample),
    }
    for k in (None, -15):
        samplers[f"opendp {opendp_version} make_gaussian (k={k})"] = time_opendp(
            args.opendp_sample, k
        )
    for figures in samplers.values():
        per = figures["seconds"] / figures["coordinates"]
        figures["microseconds_per_coordinate"] = round(1e6 * per, 4)
        figures["seconds_for_release"] = round(per * args.coordinates, 1)
    results = {
        "command": " ".join(["python", "benchmarks/bench_noise.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "platform": platform.platform()},
        "release_coordinates": args.coordinates,
        "samplers": samplers,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    lines = [
        f"# DP noise samplers, {args.coordinates:,} coordinates\n",
        f"`{results['command']}` on {results['machine']['cpu']}, {results['date']}; one core.\n",
        f"gradmm samples exactly up to {EXACT_MAX_COORDINATES:,} released numbers.\n",
        "| sampler | timed on | µs / coordinate | seconds for the release |",
        "|---|---|---|---|",
    ]
    for name, f in samplers.items():
        lines.append(
            f"| {name} | {f['coordinates']:,} | {f['microseconds_per_coordinate']} | "
            f"{f['seconds_for_release']} |"
        )
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
