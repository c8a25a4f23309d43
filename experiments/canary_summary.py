"""Copy the public numbers of a canary audit out of its PRIVATE folder.

    python experiments/canary_summary.py /tmp/canary-gradmm \
        --out experiments/results/canary/gradmm.json

``gradmm canary-audit`` writes everything into one private folder (the canaries carry real
prefixes; which were planted is the secret). Its report's settings and aggregate numbers are
public; this keeps exactly those, with the commit the audit ran on, and nothing else.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from gradmm.files import read_json, write_json

PUBLIC = [
    "config",
    "synthetic_examples",
    "attack",
    "planted",
    "members",
    "non_members",
    "roc_auc",
    "tpr_at_fpr_0.01",
    "tpr_at_fpr_0.1",
    "suffix_ngrams_seen_members",
    "suffix_ngrams_seen_non_members",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit_dir", type=Path, help="the --out folder of gradmm canary-audit")
    parser.add_argument("--out", type=Path, required=True, help="public JSON to write")
    args = parser.parse_args()
    report = read_json(args.audit_dir / "report.json")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    public = {k: report[k] for k in PUBLIC if k in report}
    note = "public numbers of a PRIVATE canary-audit report.json"
    write_json(args.out, {**public, "commit": commit, "note": note})


if __name__ == "__main__":
    main()
