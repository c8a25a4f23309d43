"""Empirical privacy audit of a run: how close is the synthetic text to the private pool?

For each synthetic example: the longest token n-gram it shares with any private example, and its
nearest private example by token-set Jaccard similarity. The audit re-reads the private pool (it
re-derives it from the release's task, split, seed and counts), so it is itself private code and
its report is private data that no DP release covers: it holds only statistics, never text, is
labelled private, and is written where the user says (by default beside the run folder, never
inside it, so that publishing a run folder never publishes its audit).

With a fine-tuned model (``gradmm finetune --save-model``), a loss-threshold membership-inference
test: the ROC AUC of telling pool members from as many held-out real examples of the same split
by the model's classification loss (0.5 = no signal; above 0.5, members have lower loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradmm.core.tokens import encode_text
from gradmm.errors import UserError
from gradmm.files import STAMP, check_result_file, read_json, read_jsonl, write_json
from gradmm.privacy.configs import AuditConfig
from gradmm.stages.generate import load_run_release
from gradmm.stages.release import audited_pool

PRIVATE_LABEL = (
    "PRIVATE: computed from the private pool and not covered by any DP release; do not publish "
    "it with the synthetic data"
)


def default_report_path(run_dir: Path) -> Path:
    """``RUN.audit.json`` beside the run folder ``RUN`` (outside it)."""
    run_dir = Path(run_dir).resolve()  # `.` has no name
    return run_dir.parent / f"{run_dir.name}.audit.json"


class SubstringIndex:
    """Every contiguous token run of a set of sequences, as a suffix automaton: built in time and
    memory linear in their total length (a set of all n-grams grows with its square: a folder of
    long texts would exhaust memory), and :meth:`longest_common_run` is linear in the query."""

    def __init__(self, sequences: list[list[int]]):
        # state 0 is the root; per state: transitions, suffix link, longest string length
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length = [-1], [0]
        for seq in sequences:
            last = 0  # each sequence starts afresh: no run spans two sequences
            for token in seq:
                last = self._extend(last, token)

    def _extend(self, last: int, token: int) -> int:
        nxt, link, length = self.next, self.link, self.length
        if token in nxt[last]:  # already there (a repeated sequence start): split if needed
            q = nxt[last][token]
            if length[q] == length[last] + 1:
                return q
            return self._clone(last, q, token)
        cur = len(nxt)
        nxt.append({})
        link.append(0)
        length.append(length[last] + 1)
        p = last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            link[cur] = q if length[q] == length[p] + 1 else self._clone(p, q, token)
        return cur

    def _clone(self, p: int, q: int, token: int) -> int:
        nxt, link, length = self.next, self.link, self.length
        clone = len(nxt)
        nxt.append(dict(nxt[q]))
        link.append(link[q])
        length.append(length[p] + 1)
        while p != -1 and nxt[p].get(token) == q:
            nxt[p][token] = clone
            p = link[p]
        link[q] = clone
        return clone

    def longest_common_run(self, tokens: list[int]) -> int:
        """Length of the longest contiguous run of ``tokens`` that occurs in an indexed
        sequence."""
        state = matched = best = 0
        for token in tokens:
            while state and token not in self.next[state]:
                state = self.link[state]
                matched = self.length[state]
            if token in self.next[state]:
                state = self.next[state][token]
                matched += 1
            best = max(best, matched)
        return best


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def planted_file(release) -> Path:
    """The planted rows of a canary audit's release: ``planted.jsonl`` of the canary-audit
    folder that holds the release, checked to hold as many rows per class as were planted."""
    from gradmm.privacy.canary import CANARY_AUDIT_DIR, PLANTED_FILE

    folder = release.path.resolve().parent
    path = folder / PLANTED_FILE
    stamp = read_json(folder / STAMP) if (folder / STAMP).is_file() else None
    if (
        not path.is_file()
        or not isinstance(stamp, dict)
        or stamp.get("kind") != (CANARY_AUDIT_DIR.name)
    ):
        raise UserError(
            f"{release.path} planted canary rows in its pool; they are in the "
            f"{PLANTED_FILE} of its canary-audit folder, not beside it"
        )
    per_class = [0] * release.task.num_classes
    for row in read_jsonl(path):
        per_class[int(row["label"])] += 1
    if per_class != release.meta.planted:
        raise UserError(
            f"{path} holds {per_class} rows per class, not the {release.meta.planted} "
            "planted in the release"
        )
    return path


def roc_auc(member_scores: list[float], other_scores: list[float]) -> float:
    """P(a member scores higher than a non-member), ties counted half (Mann-Whitney U / n m)."""
    wins = sum((m > o) + 0.5 * (m == o) for m in member_scores for o in other_scores)
    return wins / (len(member_scores) * len(other_scores))


def membership_auc(model: str, task, examples, members: list[int], others: list[int]) -> float:
    """ROC AUC of the loss-threshold attack on ``model`` (lower loss = predicted member)."""
    import torch

    from gradmm.core.tokens import tokenize_prompt
    from gradmm.models.loading import load_model
    from gradmm.stages.evaluate import label_log_probs

    lm = load_model(model)
    prompt = tokenize_prompt(task, lm.tokenizer)

    def losses(ix: list[int]) -> list[float]:
        with torch.no_grad():
            lp = label_log_probs(lm, prompt, [examples.texts[i] for i in ix])
        y = torch.tensor([examples.labels[i] for i in ix])
        return torch.nn.functional.cross_entropy(lp, y, reduction="none").tolist()

    return roc_auc([-v for v in losses(members)], [-v for v in losses(others)])


def audit_run(
    run_dir: Path,
    config: AuditConfig | None = None,
    out: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Audit ``run_dir`` against its release's private pool; writes the report to ``out``
    (default :func:`default_report_path`) and returns it."""
    config = config or AuditConfig()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_report_path(run_dir)
    if out.resolve().is_relative_to(run_dir.resolve()):
        raise UserError(
            f"{out} is inside the run folder; the audit report is private: write it elsewhere"
        )
    check_result_file(out, "audit", overwrite)
    rows = read_jsonl(run_dir / "synthetic.jsonl")
    release = load_run_release(run_dir)
    meta = release.meta
    header = {"stage": "audit", "private": True, "label": PRIVATE_LABEL, "run": str(run_dir)}
    if meta.target == "noise":
        result = {**header, "pool": "none: the release read no data", "examples": []}
        write_json(out, result)
        return result
    # the release does not record where the data lives: --data-dir or $GRADMM_DATA_DIR
    canaries = planted_file(release) if meta.planted is not None else None
    examples, picked, held_out = audited_pool(meta, config.data_dir, canaries)
    members = [i for ix in picked for i in ix]
    result = {**header, **_overlap_report(release, rows, [examples.texts[i] for i in members])}
    result["membership_inference"] = (
        _membership_report(config, release.task, examples, members, held_out)
        if config.finetuned is not None
        else "not run: pass a fine-tuned model (gradmm finetune --save-model)"
    )
    write_json(out, result)
    return result


def _overlap_report(release, rows: list[dict], pool_texts: list[str]) -> dict:
    """Per synthetic row, its longest common token run with any pool text and its nearest pool
    text by token-set Jaccard, and their summary; each pool text as far as the release read it
    (its task's cut), the synthetic ones whole."""
    from transformers import AutoTokenizer

    from gradmm.models.checkpoints import resolve_model_name

    meta = release.meta
    model = meta.model.path or resolve_model_name(meta.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model)
    cut = release.prompt.max_text_tokens
    pool = [encode_text(tokenizer, text)[:cut] for text in pool_texts]
    index, pool_sets = SubstringIndex(pool), [set(p) for p in pool]
    per_example = []
    for row in rows:
        toks = encode_text(tokenizer, row["text"])
        per_example.append(
            {
                "id": row["id"],
                "longest_common_ngram": index.longest_common_run(toks),
                "nearest_jaccard": round(max(jaccard(set(toks), s) for s in pool_sets), 4),
            }
        )
    ngrams = [e["longest_common_ngram"] for e in per_example]
    nearest = [e["nearest_jaccard"] for e in per_example]
    return {
        "data_read": [
            {
                "data": f"the release's private pool ({len(pool)} examples of split "
                f"{meta.split!r})",
                "private": True,
                "covered_by_dp": False,
            },
        ],
        "pool": {"examples": len(pool), "split": meta.split, "seed": meta.seed},
        "summary": {
            "max_longest_common_ngram": max(ngrams),
            "mean_longest_common_ngram": round(sum(ngrams) / len(ngrams), 3),
            "share_with_8gram_or_longer": round(sum(n >= 8 for n in ngrams) / len(ngrams), 4),
            "max_nearest_jaccard": max(nearest),
            "mean_nearest_jaccard": round(sum(nearest) / len(nearest), 4),
        },
        "examples": per_example,
    }


def _membership_report(
    config: AuditConfig, task, examples, members: list[int], held_out: list[int]
) -> dict:
    """The loss-threshold attack on the fine-tuned model: pool members against as many
    held-out rows of the split (seeded sample)."""
    if len(held_out) < len(members):
        raise UserError("too few held-out examples in the split for the membership test")
    rng = np.random.default_rng(config.seed)
    others = sorted(rng.choice(held_out, len(members), replace=False))
    auc = membership_auc(config.finetuned, task, examples, members, others)
    return {
        "model": config.finetuned,
        "members": len(members),
        "non_members": len(others),
        "roc_auc": round(auc, 4),
    }
