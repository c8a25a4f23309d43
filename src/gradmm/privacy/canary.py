"""Canary audit: membership inference from the synthetic text alone (Meeus et al., ICML 2025,
"The Canary's Echo").

An auditor who sees only the synthetic data asks whether a record was in the private pool.
Canaries make that measurable: each is an in-distribution prefix (the first words of a real
example of the private split that no pool draws) followed by a high-perplexity suffix (tokens
drawn uniformly from the vocabulary), with a random label. A seeded half is planted in the pool
before the release; the other half is never seen. Generation runs as usual, then an n-gram
language model fitted on the synthetic texts scores every canary's suffix (mean log-probability
of its tokens after its own context): planted canaries echoed by the synthetic text score
higher. The audit reports the ROC AUC of members vs non-members (0.5: the synthetic text says
nothing about membership) and the TPR at low FPR.

Everything here is private: the canaries carry real prefixes and the planted set is the secret
the attack guesses. :func:`canary_audit` writes them, the release, the run and the report into
one folder labelled private.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from gradmm.core.tokens import encode_text
from gradmm.data.tasks import Task
from gradmm.errors import UserError
from gradmm.files import (
    OutputKind,
    check_output_dir,
    make_output_dir,
    read_jsonl,
    write_json,
    write_jsonl,
)
from gradmm.privacy.audit import roc_auc
from gradmm.privacy.configs import CanaryAuditConfig

REPORT_LABEL = (
    "PRIVATE: canaries carry prefixes of real private examples, and which were planted is the "
    "secret the attack guesses"
)


# A canary audit's folder: everything in it is private.
CANARY_AUDIT_DIR = OutputKind(
    "canary-audit",
    "report.json",
    ("canaries.jsonl", "planted.jsonl", "release", "run", "report.json"),
)
PLANTED_FILE = "planted.jsonl"  # the rows planted in the pool, beside the audit's release/

# What a planted canary's membership means, by the release's sampling.
PLANTED = {
    "fixed": "every planted canary is in the pool",
    "poisson": "every planted canary is in the pool, added to the Poisson sample: the audit "
    "conditions on each canary being sampled, so it tests the mechanism at its σ without the "
    "amplification by sampling that the guarantee counts (a stronger attacker than the "
    "guarantee assumes)",
}


def make_canaries(
    task: Task, tokenizer, examples_texts: list[str], candidates: list[int], cfg: CanaryAuditConfig
) -> list[dict]:
    """``cfg.canaries`` canaries ``{"text", "label", "suffix"}``: prefixes from distinct
    ``candidates`` rows, suffixes of uniformly random printable vocabulary tokens."""
    rng = np.random.default_rng(cfg.seed)
    if len(candidates) < cfg.canaries:
        raise UserError(
            f"only {len(candidates)} examples can give canary prefixes; ask for fewer canaries"
        )
    vocab = [t for t in range(len(tokenizer)) if tokenizer.decode([t]).strip().isalpha()]
    out = []
    for i in rng.choice(candidates, cfg.canaries, replace=False):
        prefix = " ".join(examples_texts[i].split()[: cfg.prefix_words])
        suffix = tokenizer.decode(rng.choice(vocab, cfg.suffix_tokens).tolist())
        out.append(
            {
                "text": f"{prefix} {suffix.strip()}",
                "label": int(rng.integers(task.num_classes)),
                "suffix": suffix.strip(),
            }
        )
    return out


class NgramModel:
    """An order-``n`` token n-gram model with add-one smoothing, fitted on token sequences."""

    def __init__(self, sequences: list[list[int]], n: int, vocab_size: int):
        self.n, self.vocab = n, vocab_size
        self.counts: Counter = Counter()
        self.contexts: Counter = Counter()
        for seq in sequences:
            padded = [-1] * (n - 1) + seq
            for i in range(n - 1, len(padded)):
                context = tuple(padded[i - n + 1 : i])
                self.counts[context + (padded[i],)] += 1
                self.contexts[context] += 1

    def log_prob(self, context: list[int], token: int) -> float:
        """log P(token | the last n − 1 tokens of ``context``), padded at the start."""
        ctx = tuple(([-1] * (self.n - 1) + context)[len(context) :]) if self.n > 1 else ()
        return math.log((self.counts[ctx + (token,)] + 1) / (self.contexts[ctx] + self.vocab))

    def score(self, prefix: list[int], suffix: list[int]) -> float:
        """Mean log-probability of ``suffix``'s tokens, each after everything before it."""
        seq = prefix + suffix
        start = len(prefix)
        return sum(self.log_prob(seq[:i], seq[i]) for i in range(start, len(seq))) / len(suffix)

    def seen_fraction(self, prefix: list[int], suffix: list[int]) -> float:
        """Share of the n-grams :meth:`score` scores (each suffix token after its context) that
        occur in the fitted text: the material the attack has to work with."""
        seq = [-1] * (self.n - 1) + prefix + suffix
        start = len(seq) - len(suffix)
        return sum(
            self.counts[tuple(seq[i - self.n + 1 : i + 1])] > 0 for i in range(start, len(seq))
        ) / len(suffix)


def tpr_at_fpr(member_scores: list[float], other_scores: list[float], fpr: float) -> float:
    """True-positive rate at the threshold that lets at most ``fpr`` of non-members through."""
    others = np.sort(np.asarray(other_scores))[::-1]
    allowed = int(math.floor(fpr * len(others)))
    threshold = others[allowed] if allowed < len(others) else -np.inf
    return float(np.mean(np.asarray(member_scores) > threshold))


def attack(
    canaries: list[dict], planted: list[bool], synthetic: list[str], tokenizer, ngram: int
) -> dict:
    """Score every canary with an n-gram model of ``synthetic``; AUC and TPR at low FPR."""
    model = NgramModel([encode_text(tokenizer, t) for t in synthetic], ngram, len(tokenizer))
    scores, seen = [], []
    for c in canaries:
        prefix = encode_text(tokenizer, c["text"][: len(c["text"]) - len(c["suffix"])].rstrip())
        suffix = encode_text(tokenizer, " " + c["suffix"])
        scores.append(model.score(prefix, suffix))
        seen.append(model.seen_fraction(prefix, suffix))
    members = [s for s, p in zip(scores, planted, strict=True) if p]
    others = [s for s, p in zip(scores, planted, strict=True) if not p]
    return {
        "members": len(members),
        "non_members": len(others),
        "roc_auc": round(roc_auc(members, others), 4),
        "tpr_at_fpr_0.01": round(tpr_at_fpr(members, others, 0.01), 4),
        "tpr_at_fpr_0.1": round(tpr_at_fpr(members, others, 0.1), 4),
        # the attack's power: how much of the scored suffix n-grams the synthetic text holds
        "suffix_ngrams_seen_members": round(
            float(np.mean([f for f, p in zip(seen, planted, strict=True) if p])), 4
        ),
        "suffix_ngrams_seen_non_members": round(
            float(np.mean([f for f, p in zip(seen, planted, strict=True) if not p])), 4
        ),
    }


def canary_audit(cfg: CanaryAuditConfig, out: Path, progress: bool = True) -> dict:
    """Make canaries, plant half in the pool, release, generate, attack; writes ``out``
    (``canaries.jsonl``, ``release/``, ``run/``, ``report.json``, all private) and returns the
    report. A rerun resumes: finished steps are kept."""
    from gradmm.data.tasks import load_task
    from gradmm.models.loading import load_model
    from gradmm.options import build_config
    from gradmm.stages.configs import GenerateConfig, ReleaseConfig
    from gradmm.stages.generate import generate
    from gradmm.stages.release import check_release_settings, release_targets, rows_outside_pool

    out = Path(out)
    # every setting and the folder first: nothing is loaded or written before they pass
    rc = build_config(ReleaseConfig, cfg.release)
    check_release_settings(rc)
    generate_config = build_config(GenerateConfig, cfg.generate)
    check_output_dir(out, CANARY_AUDIT_DIR)
    task = load_task(rc.task)
    split = rc.split or task.private_split
    tokenizer = load_model(rc.model).tokenizer
    make_output_dir(out, CANARY_AUDIT_DIR)
    canary_file = out / "canaries.jsonl"
    if not canary_file.exists():
        # prefixes from rows outside the dev slice and, for a fixed pool, outside the pool (a
        # Poisson sample is drawn at release: any row may join it, members and others alike)
        examples, candidates = rows_outside_pool(rc, task, split)
        canaries = make_canaries(task, tokenizer, examples.texts, candidates, cfg)
        planted = (
            np.random.default_rng(cfg.seed + 1).permutation(len(canaries)) < len(canaries) // 2
        )
        write_jsonl(
            canary_file, [{**c, "planted": bool(p)} for c, p in zip(canaries, planted, strict=True)]
        )
    rows = read_jsonl(canary_file)
    planted_file = out / PLANTED_FILE
    write_jsonl(
        planted_file, [{"text": r["text"], "label": r["label"]} for r in rows if r["planted"]]
    )
    release = out / "release"
    if not (release / "release.json").exists():
        release_targets(rc.model_copy(update={"canary_file": str(planted_file)}), release)
    run = out / "run"
    if not (run / "synthetic.jsonl").exists():
        generate(release, run, generate_config, progress=progress)
    synthetic = [r["text"] for r in read_jsonl(run / "synthetic.jsonl")]
    report = {
        "stage": "canary-audit",
        "private": True,
        "label": REPORT_LABEL,
        "config": cfg.model_dump(mode="json"),
        "synthetic_examples": len(synthetic),
        "attack": f"{cfg.ngram}-gram model (add-one) of the synthetic text; score: mean "
        "log-probability of the canary's suffix tokens",
        "planted": PLANTED[rc.sampling],
        **attack(rows, [r["planted"] for r in rows], synthetic, tokenizer, cfg.ngram),
    }
    write_json(out / "report.json", report)
    return report
