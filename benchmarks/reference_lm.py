"""Quality and cost of the reference LM; writes benchmarks/results/reference_lm.{json,md} and the
model card (README.md) of the model folder.

    python benchmarks/reference_lm.py --model reference --data-dir ../shared/data

Measures: per-token perplexity on 1,000 held-out IMDB *test* reviews (seeded sample, first 256
tokens of each, scored after an end-of-text token as in training; also split into tokens 1-128 and
129-256), on SST-2 validation and Rotten Tomatoes test sentences; zero-shot verbalizer accuracy on
SST-2 validation ("<text> It was" -> " great" vs " bad"); the time of one GRADMM inner step
(forward + backward of the closed-form matching loss over 10 sequences x 32 tokens, median of 20);
ten greedy and ten sampled continuations of review-like prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from gradmm.core.lm import final_hidden, right_padded
from gradmm.core.matching import MatchingLoss
from gradmm.core.tokens import LabelTokens, tokenize_prompt
from gradmm.data.tasks import BUILTIN_TASKS, load_examples
from gradmm.files import write_json, write_text
from gradmm.models.checkpoints import resolve_model_name
from gradmm.models.loading import load_model
from gradmm.stages.evaluate import label_log_probs

PROMPTS = [
    "This movie was",
    "I have to say that the acting",
    "The plot of this film",
    "My favorite part of the movie",
    "The director",
    "I would not recommend",
    "One of the best",
    "The story is about",
    "It was a waste of",
    "The soundtrack",
]


@torch.no_grad()
def nll_by_position(lm, texts: list[str], max_tokens: int = 256, batch: int = 16):
    """Summed NLL and token count of each text position (< ``max_tokens``), after an EOS token."""
    eos = lm.tokenizer.eos_token_id
    seqs = [[eos] + lm.tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts]
    nll, count = torch.zeros(max_tokens, dtype=torch.float64), torch.zeros(max_tokens)
    for i in range(0, len(seqs), batch):
        ids, mask, _ = right_padded(seqs[i : i + batch])
        width = ids.shape[1]
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        )
        nll[: width - 1] += (loss * mask[:, 1:]).sum(0).double()
        count[: width - 1] += mask[:, 1:].sum(0)
    return nll, count


def perplexity(nll: torch.Tensor, count: torch.Tensor, positions: slice = slice(None)) -> float:
    """exp(total NLL / total tokens) over ``positions`` of ``nll_by_position``'s output."""
    return round(math.exp(float(nll[positions].sum() / count[positions].sum())), 2)


@torch.no_grad()
def zero_shot_accuracy(lm, task, texts: list[str], labels: list[int]) -> float:
    pred = label_log_probs(lm, tokenize_prompt(task, lm.tokenizer), texts).argmax(1)
    return float((pred == torch.tensor(labels)).float().mean())


def inner_step_seconds(lm, batch: int = 10, length: int = 32, repeats: int = 20) -> float:
    out = lm.output
    vocab, dim = out.weight.shape
    gen = torch.Generator().manual_seed(0)
    tb = None if out.bias is None else torch.randn(1, vocab, generator=gen)
    loss = MatchingLoss(torch.randn(1, vocab, dim, generator=gen), tb, out, LabelTokens.of([[1]]))
    x = torch.randn(1, batch, length, dim, generator=gen, requires_grad=True)
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        h = final_hidden(lm.model, inputs_embeds=x[0])[:, -1:]  # (B, K=1, d)
        loss(h[None], torch.tensor([0])).sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


@torch.no_grad()
def continuations(lm, sample: bool, tokens: int = 30) -> list[str]:
    torch.manual_seed(0)
    out = []
    for p in PROMPTS:
        ids = lm.tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids
        gen = lm.model.generate(
            ids,
            max_new_tokens=tokens,
            do_sample=sample,
            top_k=50 if sample else None,
            temperature=0.8 if sample else None,
            top_p=None,
            pad_token_id=lm.tokenizer.eos_token_id,
        )
        out.append(p + lm.tokenizer.decode(gen[0, ids.shape[1] :]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reference_lm"))
    ap.add_argument("--n-imdb", type=int, default=1000)
    args = ap.parse_args()
    lm = load_model(args.model)
    folder = Path(resolve_model_name(args.model))
    imdb = load_examples(BUILTIN_TASKS["imdb"], "test", args.data_dir)
    pick = np.random.default_rng(0).choice(len(imdb.texts), args.n_imdb, replace=False)
    imdb_texts = [imdb.texts[i].replace("<br />", " ") for i in pick]
    sst2 = load_examples(BUILTIN_TASKS["sst2"], "validation", args.data_dir)
    rt = load_examples(BUILTIN_TASKS["rotten_tomatoes"], "test", args.data_dir)
    imdb = nll_by_position(lm, imdb_texts)
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "inner_step_seconds_10x32": round(inner_step_seconds(lm), 4),
        "perplexity": {
            f"imdb_test_{args.n_imdb}_reviews_256tok": perplexity(*imdb),
            "imdb_test_tokens_1_128": perplexity(*imdb, slice(0, 128)),
            "imdb_test_tokens_129_256": perplexity(*imdb, slice(128, 256)),
            "sst2_validation": perplexity(*nll_by_position(lm, sst2.texts)),
            "rotten_tomatoes_test": perplexity(*nll_by_position(lm, rt.texts)),
        },
        "zero_shot_accuracy_sst2_validation": round(
            zero_shot_accuracy(lm, BUILTIN_TASKS["sst2"], sst2.texts, sst2.labels), 4
        ),
        "greedy": continuations(lm, sample=False),
        "sampled": continuations(lm, sample=True),
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    training = json.loads((folder / "training.json").read_text())
    write_text(out.with_suffix(".md"), card(results, training))
    write_text(folder / "README.md", card(results, training))
    print(
        json.dumps({k: v for k, v in results.items() if k not in ("greedy", "sampled")}, indent=1)
    )


def card(r: dict, t: dict) -> str:
    corpus = "\n".join(
        f"| `{c['path']}` | {c['documents']} | `{c['sha256'][:16]}` |" for c in t["corpus"]
    )
    ppl = "\n".join(f"| {k} | {v} |" for k, v in r["perplexity"].items())
    greedy = "\n".join(f"{i + 1}. {s!r}" for i, s in enumerate(r["greedy"]))
    sampled = "\n".join(f"{i + 1}. {s!r}" for i, s in enumerate(r["sampled"]))
    cfg = t["config"]
    return f"""# gradmm reference LM

A small Llama trained from scratch by `gradmm lm train` so that gradmm has a model that knows
English and movie reviews where no pretrained weights can be downloaded. `--model reference`
anywhere in gradmm loads this folder. Generated by `benchmarks/reference_lm.py`; do not edit.

* Architecture: `LlamaForCausalLM`, {r["parameters"]:,} parameters, hidden {cfg["hidden_size"]},
  {cfg["layers"]} layers, {cfg["heads"]} heads, untied output layer, context 512.
* Tokenizer: byte-level BPE, {cfg["vocab_size"]} merges-vocabulary (+ whole-word tokens for
  rare label words), trained on the same corpus.
* Training: {t["steps"]} steps x {cfg["batch_size"]} x {cfg["seq_len"]} tokens =
  {t["tokens_seen"]:,} tokens seen ({t["corpus_tokens"]:,}-token corpus), AdamW lr {cfg["lr"]}
  (warm-up + cosine to 10%), seed {cfg["seed"]}; {t["wall_seconds"] / 3600:.2f} h on
  {t["threads"]} CPU threads. Final train loss {t["final_train_loss"]:.3f}, held-out loss
  (last 1% of the token stream) {t["heldout_loss"]:.3f}.

## Corpus (public text only; no built-in task's evaluation data)

| file | documents | sha256[:16] |
|---|---|---|
{corpus}

## Quality and cost ({r["date"]}, `{r["command"]}`)

| per-token perplexity | value |
|---|---|
{ppl}

* Zero-shot verbalizer accuracy on SST-2 validation: {r["zero_shot_accuracy_sst2_validation"]}
* One GRADMM inner step (10 x 32 tokens, forward + backward): {r["inner_step_seconds_10x32"]} s
  ({r["machine"]["threads"]} threads, {r["machine"]["platform"]})

## Greedy continuations

{greedy}

## Sampled continuations (top-k 50, temperature 0.8)

{sampled}
"""


if __name__ == "__main__":
    main()
