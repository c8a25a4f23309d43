"""Filtering synthetic text: the authors' three steps as composable stages, plus de-duplication.

1. ``dedupe``: identical texts of a class are kept once (the one of lowest matching loss).
2. ``classifier``: drop examples that a few-shot classifier (the LM, prompted with the task's
   hand-written public demonstrations) assigns to another class.
3. ``top``: keep per class the ``keep_per_class`` examples with the lowest per-example matching
   loss against the **released** target (so a DP run stays DP: this is post-processing).
4. ``balance``: drop the worst examples of each class until its mean loss is at most the lowest
   class mean (the authors' average-score balancing, for any number of classes).

Writes ``RUN_DIR/filtered.jsonl`` and ``RUN_DIR/filter_report.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gradmm.core.lm import LoadedModel
from gradmm.core.matching import MatchingLoss
from gradmm.core.settings import Runtime
from gradmm.core.tokens import LabelTokens, label_hidden
from gradmm.errors import UserError, warn
from gradmm.files import check_output_dir, read_jsonl, write_json, write_jsonl
from gradmm.stages.configs import FilterConfig
from gradmm.stages.evaluate import label_log_probs
from gradmm.stages.generate import RUN_DIR, data_read_entry, load_run_release
from gradmm.stages.record import Release, load_release_model


def release_loss(lm: LoadedModel, release: Release) -> MatchingLoss:
    """The closed-form matching loss against ``release``'s output-layer targets (of a
    ``last-block`` release: its output layer's part), on ``lm``'s device."""
    prompt = release.prompt
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    tb = None if release.target_bias is None else release.target_bias.to(lm.device)
    return MatchingLoss(release.target_weight.to(lm.device), tb, lm.output, labels, release.space)


@torch.no_grad()
def per_example_rec(
    lm: LoadedModel, release: Release, texts: list[str], labels: list[int], batch_size: int = 32
) -> Tensor:
    """(N,) matching loss of each example alone (a problem of ``B = 1``) against its class's
    released target."""
    prompt = release.prompt
    loss = release_loss(lm, release)
    seqs = [prompt.encode(lm.tokenizer, t) for t in texts]
    out = []
    for start in range(0, len(seqs), batch_size):
        classes = labels[start : start + batch_size]
        h = label_hidden(lm, loss.labels, seqs[start : start + batch_size], classes)
        out.append(loss(h[:, None], torch.tensor(classes, device=lm.device)).cpu())
    return torch.cat(out)


def balance_by_mean(rows_by_class: dict[int, list[dict]], key: str) -> dict[int, list[dict]]:
    """Drop each class's worst rows until its mean ``key`` <= the lowest class mean."""
    means = {c: sum(r[key] for r in rows) / len(rows) for c, rows in rows_by_class.items() if rows}
    if not means:
        return rows_by_class
    target = min(means.values())
    out = {}
    for c, rows in rows_by_class.items():
        rows = sorted(rows, key=lambda r: r[key])
        while len(rows) > 1 and sum(r[key] for r in rows) / len(rows) > target + 1e-12:
            rows = rows[:-1]
        out[c] = rows
    return out


def filter_run(
    run_dir: Path,
    config: FilterConfig,
    lm: LoadedModel | None = None,
    runtime: Runtime | None = None,
) -> dict:
    """Filter ``run_dir/synthetic.jsonl``; returns the report (also written)."""
    run_dir = Path(run_dir)
    if not check_output_dir(run_dir, RUN_DIR):  # it writes there: only into a run of gradmm's
        raise UserError(f"{run_dir} holds no finished gradmm run (no synthetic.jsonl)")
    rows = read_jsonl(run_dir / "synthetic.jsonl")
    if not rows:
        raise UserError(f"{run_dir}/synthetic.jsonl holds no examples")
    release = load_run_release(run_dir)
    lm = lm or load_release_model(release, runtime)
    kept, report = filter_rows(lm, release, rows, config)
    report["data_read"] = [
        data_read_entry(release),
        {"data": "synthetic.jsonl and the hand-written public demonstrations", "private": False},
    ]
    write_jsonl(run_dir / "filtered.jsonl", kept)
    write_json(run_dir / "filter_report.json", report)
    return report


def filter_rows(
    lm: LoadedModel, release: Release, rows: list[dict], config: FilterConfig
) -> tuple[list[dict], dict]:
    """The steps of the module docstring on ``rows`` (``{"text", "label", ...}``, of any origin:
    a run's texts or the LM's prompted ones) against ``release``: the kept rows, in their input
    order and each with its ``example_rec_loss``, and the report of what each step kept."""
    task = release.task
    rows = [dict(r, order=i) for i, r in enumerate(rows)]
    report: dict = {"input": len(rows)}
    recs = per_example_rec(lm, release, [r["text"] for r in rows], [r["label"] for r in rows])
    for r, rec in zip(rows, recs.tolist(), strict=True):
        r["example_rec_loss"] = round(rec, 6)
    if config.dedupe:
        best: dict[tuple, dict] = {}
        for r in rows:
            key = (r["label"], r["text"])
            if key not in best or r["example_rec_loss"] < best[key]["example_rec_loss"]:
                best[key] = r
        rows = [r for r in rows if best[(r["label"], r["text"])] is r]
        report["after_dedupe"] = len(rows)
    if config.classifier:
        demos = task.require_demonstrations("the few-shot classifier (or pass --no-classifier)")
        prompt = release.prompt
        prefix = prompt.demonstrations(lm.tokenizer, list(demos))
        pred = label_log_probs(lm, prompt, [r["text"] for r in rows], prefix).argmax(1).tolist()
        rows = [r for r, p in zip(rows, pred, strict=True) if p == r["label"]]
        report["after_classifier"] = len(rows)
    by_class = {c: [r for r in rows if r["label"] == c] for c in range(task.num_classes)}
    if config.keep_per_class is not None:
        by_class = {
            c: sorted(rs, key=lambda r: r["example_rec_loss"])[: config.keep_per_class]
            for c, rs in by_class.items()
        }
        report["after_top"] = sum(map(len, by_class.values()))
    if config.balance:
        by_class = balance_by_mean(by_class, "example_rec_loss")
        report["after_balance"] = sum(map(len, by_class.values()))
    kept = sorted((r for rs in by_class.values() for r in rs), key=lambda r: r["order"])
    report["per_class"] = {task.label_names[c]: len(rs) for c, rs in by_class.items()}
    emptied = [name for name, n in report["per_class"].items() if n == 0]
    if emptied:  # fine-tuning on this set cannot teach those classes
        warn(
            f"the filter kept no text of class {', '.join(emptied)}"
            + (
                " (the few-shot classifier assigned them to other classes; filter "
                "--no-classifier keeps them)"
                if config.classifier
                else ""
            )
        )
    report["config"] = config.model_dump(mode="json")
    return [{k: v for k, v in r.items() if k != "order"} for r in kept], report
