"""``gradmm select``: the LM's own class-conditional text, selected by gradient matching.

Per class: sample ``pool`` texts from the LM under the class's public demonstrations (the
``lm_prompted`` sampler, :mod:`gradmm.stages.sampling`), drop degenerate ones (fewer than
``min_words`` words, or above ``max_perplexity``), then pick ``per_class`` of them greedily so
that their mean output-layer gradient matches the class's released target
(:mod:`gradmm.core.subset`: forward passes only). Reading the release is post-processing of it,
so a DP release stays DP; the demonstrations are public. Writes a run folder as ``gradmm
generate`` does (``synthetic.jsonl``, ``manifest.json``) that ``gradmm filter``, ``finetune`` and
``audit`` read.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradmm import __version__
from gradmm.core.settings import Runtime
from gradmm.core.subset import greedy_select, pool_gradients
from gradmm.core.tokens import label_hidden
from gradmm.errors import UserError
from gradmm.files import check_output_dir, staged_dir, write_json, write_jsonl
from gradmm.privacy.report import report as privacy_report
from gradmm.stages.configs import SelectConfig
from gradmm.stages.evaluate import text_perplexities
from gradmm.stages.filtering import release_loss
from gradmm.stages.generate import RUN_DIR, data_read_entry, release_entry
from gradmm.stages.record import load_release, load_release_model
from gradmm.stages.sampling import lm_prompted_examples


def select_texts(
    release_dir: Path,
    out: Path,
    config: SelectConfig,
    overwrite: bool = False,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> Path:
    """Sample, filter and select; returns the path of ``synthetic.jsonl``."""
    started = time.perf_counter()
    out = Path(out)
    if check_output_dir(out, RUN_DIR) and not overwrite:
        raise UserError(f"{out} already holds a finished run (pass --overwrite to replace it)")
    release = load_release(release_dir)
    lm = load_release_model(release, runtime)
    task, prompt = release.task, release.prompt
    timings = {"load": time.perf_counter() - started}

    t = time.perf_counter()
    pool = lm_prompted_examples(lm, task, prompt, config.pool, config.seed)
    perplexity = text_perplexities(lm, [row["text"] for row in pool])
    timings["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    loss = release_loss(lm, release)
    rows, per_class = [], {}
    for c in tqdm(range(task.num_classes), desc="select", disable=not progress):
        members = [i for i, row in enumerate(pool) if row["label"] == c]
        texts = [pool[i]["text"] for i in members]
        chosen, summary = _select_class(
            lm, loss, prompt, texts, [perplexity[i] for i in members], c, config
        )
        name = task.label_names[c]
        per_class[name] = summary
        rows += [
            {
                "id": len(rows) + n,
                "text": texts[j],
                "label": c,
                "label_name": name,
                "rec_loss": summary["rec_loss"],
                "perplexity": round(perplexity[members[j]], 4),
            }
            for n, j in enumerate(chosen)
        ]
    timings["select"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    manifest = _manifest(config, release, per_class, timings)
    with staged_dir(out, RUN_DIR) as tmp:
        write_jsonl(tmp / "synthetic.jsonl", rows)
        write_json(tmp / "manifest.json", manifest)
    return out / "synthetic.jsonl"


@torch.no_grad()
def _select_class(lm, loss, prompt, texts, perplexity, c: int, config: SelectConfig):
    """(indices of the selected texts of class ``c``, a summary for the manifest)."""
    eligible = torch.tensor(
        [_eligible(text, ppl, config) for text, ppl in zip(texts, perplexity, strict=True)]
    )
    if int(eligible.sum()) < config.per_class:
        raise UserError(
            f"only {int(eligible.sum())} of {len(texts)} sampled texts of class {c} pass "
            f"--min-words/--max-perplexity; {config.per_class} are needed: raise --pool or "
            "relax them"
        )
    seqs = [prompt.encode(lm.tokenizer, text) for text in texts]
    h = torch.cat(
        [
            label_hidden(lm, loss.labels, seqs[k : k + 32], [c] * len(seqs[k : k + 32]))
            for k in range(0, len(seqs), 32)
        ]
    )
    gradients = pool_gradients(loss, h, c)
    chosen = greedy_select(gradients, config.per_class, eligible)
    first = eligible.nonzero().flatten()[: config.per_class].tolist()
    summary = {
        "sampled": len(texts),
        "eligible": int(eligible.sum()),
        "rec_loss": round(gradients.rec(chosen), 6),
        "rec_loss_unselected": round(gradients.rec(first), 6),  # the first eligible N
    }
    return chosen, summary


def _eligible(text: str, perplexity: float, config: SelectConfig) -> bool:
    """Not degenerate: enough words, and (with a limit) fluent enough."""
    fluent = config.max_perplexity is None or perplexity <= config.max_perplexity
    return len(text.split()) >= config.min_words and fluent


def _manifest(config: SelectConfig, release, per_class: dict, timings: dict) -> dict:
    recs = [v["rec_loss"] for v in per_class.values()]
    return {
        "stage": "select",
        "gradmm_version": __version__,
        "config": config.model_dump(mode="json"),
        "release": release_entry(release),
        "privacy_report": privacy_report(release.meta),
        "data_read": [
            data_read_entry(release),
            {"data": "the task's public demonstrations (the sampling prompt)", "private": False},
        ],
        "per_class": per_class,
        "counts": {name: config.per_class for name in per_class},
        "mean_rec_loss": sum(recs) / len(recs),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
