"""Zero-shot accuracy with label words of several tokens; writes results/label_words.{json,md}.

    gradmm model fetch smollm2-135m && python benchmarks/label_words.py

Scores SST-2 (a seeded sample of its validation split) with the built-in one-token verbalizer
and with one whose negative word splits into several tokens, scored as the whole word
(``label_token_policy: all``, gradmm's default) with its tokens' log-probabilities summed
(``label_score: sum``) or averaged (``mean``), and as its first token only (``first``, the
authors' code). Needs ``$GRADMM_DATA_DIR`` (or ``--data-dir``) laid out like shared/data.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py

from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import BUILTIN_TASKS
from gradmm.files import write_json, write_text
from gradmm.models.loading import load_model
from gradmm.stages.evaluate import accuracy, test_set

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--words", nargs=2, default=[" mediocre", " masterpiece"])
    parser.add_argument("--out", default=str(RESULTS / "label_words"))
    args = parser.parse_args()
    lm = load_model(args.model)
    base = BUILTIN_TASKS["sst2"]
    test = test_set(base, args.data_dir, args.max_test, seed=0)
    words = {"label_words": tuple(args.words)}
    variants = {
        "built-in": base,
        "whole word, summed (all, sum)": base.model_copy(update=words),
        "whole word, averaged (all, mean)": base.model_copy(
            update={**words, "label_score": "mean"}
        ),
        "first token (first)": base.model_copy(update={**words, "label_token_policy": "first"}),
    }
    rows = []
    for name, task in variants.items():
        prompt = tokenize_prompt(task, lm.tokenizer)
        started = time.perf_counter()
        result = accuracy(lm, prompt, test, task.label_names)
        rows.append(
            {
                "verbalizer": name,
                "label_words": list(task.label_words),
                "tokens": [[lm.tokenizer.decode([i]) for i in w] for w in prompt.label_ids],
                "accuracy": round(result["accuracy"], 4),
                "per_class_accuracy": result["per_class_accuracy"],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(rows[-1], flush=True)
    record = {
        "model": args.model,
        "task": "sst2",
        "test_examples": len(test.texts),
        "rows": rows,
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(Path(args.out + ".json"), record)
    lines = [
        f"# Zero-shot SST-2 with multi-token label words ({args.model})",
        "",
        f"`{record['command']}` on {record['machine']['cpu']} ({record['machine']['threads']} "
        f"threads), {record['date']}; {len(test.texts)} seeded validation examples.",
        "",
        "| verbalizer | tokens | accuracy | neg / pos accuracy | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per = " / ".join(f"{v:.3f}" for v in r["per_class_accuracy"].values())
        lines.append(
            f"| {r['verbalizer']} | {r['tokens']} | {r['accuracy']:.3f} | {per} | {r['seconds']} |"
        )
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
