"""Speed of class scoring (``label_log_probs``): writes results/scoring.{json,md}.

    gradmm model fetch smollm2-135m && python benchmarks/bench_scoring.py

Scoring is what fine-tuning (a LoRA step: forward and backward), dev/test evaluation and the
few-shot classifier spend their time in. Compares gradmm's way (the output layer at the scored
positions only; few-shot demonstrations run once and cached) with the plain way it replaced
(the model's logits at every position, the demonstrations recomputed for every text), on the
same SST-2 validation texts. Needs ``$GRADMM_DATA_DIR`` (or ``--data-dir``) laid out like
shared/data.
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

from gradmm.core.lm import right_padded
from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import BUILTIN_TASKS
from gradmm.files import write_json, write_text
from gradmm.models.loading import load_model
from gradmm.stages.evaluate import demonstrations, dev_set, label_log_probs, test_set

RESULTS = Path(__file__).parent / "results"


def full_logits_scores(lm, prompt, texts, prefix=None, batch_size=32):
    """The replaced way: every position's logits, the prefix recomputed for every text."""
    seqs = [(prefix or []) + prompt.encode(lm.tokenizer, t) for t in texts]
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        rows = torch.arange(len(batch))[:, None]
        scores = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for c, word in enumerate(prompt.label_ids):
            groups.setdefault(tuple(word[:-1]), []).append(c)
        for feed, classes in groups.items():
            ids, mask, last = right_padded([s + list(feed) for s in batch])
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
            pos = last[:, None] - len(feed) + torch.arange(len(feed) + 1)
            logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)
            for c in classes:
                word = torch.tensor(prompt.label_ids[c])
                token_logp = logp[:, torch.arange(len(word)), word]
                mean = prompt.label_score == "mean"
                scores[c] = token_logp.mean(1) if mean else token_logp.sum(1)
        out.append(torch.stack([scores[c] for c in range(len(prompt.label_ids))], 1))
    return torch.cat(out)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--examples", type=int, default=64, help="texts scored per timing")
    parser.add_argument("--batch-size", type=int, default=16, help="of the training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "scoring"))
    args = parser.parse_args()
    lm = load_model(args.model)
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    texts = test_set(task, args.data_dir, args.examples, seed=0).texts
    prefix = demonstrations(lm, prompt, dev_set(task, args.data_dir), 2, seed=0)

    from peft import LoraConfig, get_peft_model

    lm.model = get_peft_model(
        lm.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    )
    train_batch = texts[: args.batch_size]

    def step(scores_fn):
        def run():
            loss = -scores_fn(lm, prompt, train_batch)[:, 0].mean()
            loss.backward()

        return run

    def scoring(scores_fn, demos):
        def run():
            with torch.no_grad():
                scores_fn(lm, prompt, texts, demos)

        return run

    cases = {
        f"LoRA training step (batch {args.batch_size})": (
            step(full_logits_scores),
            step(label_log_probs),
        ),
        f"zero-shot scoring ({len(texts)} texts)": (
            scoring(full_logits_scores, None),
            scoring(label_log_probs, None),
        ),
        f"2-shot scoring ({len(texts)} texts, {len(prefix)}-token demonstrations)": (
            scoring(full_logits_scores, prefix),
            scoring(label_log_probs, prefix),
        ),
    }
    with torch.no_grad():  # the two ways agree before they are timed
        torch.testing.assert_close(
            label_log_probs(lm, prompt, texts[:8], prefix),
            full_logits_scores(lm, prompt, texts[:8], prefix),
            rtol=1e-3,
            atol=1e-4,
        )
    rows = []
    for name, (plain, ours) in cases.items():
        before, after = timed(plain, args.repeats), timed(ours, args.repeats)
        rows.append(
            {
                "case": name,
                "full_logits_seconds": round(before, 3),
                "gradmm_seconds": round(after, 3),
                "speedup": round(before / after, 2),
            }
        )
        print(rows[-1], flush=True)
    record = {
        "model": args.model,
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
        f"# Class scoring: output layer at the scored positions, cached demonstrations "
        f"({args.model})",
        "",
        f"`{record['command']}` on {record['machine']['cpu']} ({record['machine']['threads']} "
        f"threads), {record['date']}; mean of {args.repeats} runs after a warm-up.",
        "",
        "| case | every position's logits (s) | gradmm (s) | speedup |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['full_logits_seconds']} | {r['gradmm_seconds']} | "
            f"{r['speedup']}x |"
        )
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
