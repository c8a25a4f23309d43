"""The measurement scripts under experiments/ compute what the release computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gradmm.core.lm import matched_parameters
from gradmm.data.tasks import load_task
from gradmm.files import read_jsonl
from gradmm.models.loading import load_model
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.release import pool_rows, release_targets

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import label_separation  # noqa: E402  (a script, not a package module)


@pytest.mark.parametrize("target", list(label_separation.TARGETS))
def test_label_separation_scores_a_release_s_own_pool_as_a_perfect_match(
    target, model_dirs, data_dir, tmp_path
):
    """The batch gradient of the script (closed form, or autograd for the last block) of a
    class's pool is the release's target of that class: matching loss 0; against the other
    class's target it is not."""
    options = {**label_separation.TARGETS[target]}
    if "sketch_dim" in options:
        options["sketch_dim"] = 4  # the fixture model is small
    model = str(model_dirs["llama"])
    config = ReleaseConfig(
        model=model, task="sst2", n_per_class=4, data_dir=str(data_dir), **options
    )
    release = release_targets(config, tmp_path / "rel")
    lm = load_model(model)
    params = matched_parameters(lm.model, release.meta.match_params)
    rows = pool_rows(load_task("sst2"), 4, 0, str(data_dir))
    for c in (0, 1):
        seqs = [release.prompt.encode(lm.tokenizer, r["text"]) for r in rows if r["label"] == c]
        grads = label_separation.batch_gradient(lm, release, params, seqs, c)
        assert label_separation.matching_loss(release, grads, c) == pytest.approx(0, abs=1e-5)
        assert label_separation.matching_loss(release, grads, 1 - c) > 1e-3


def test_sweep_select_variant_keeps_its_floor_and_records_dev_only(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    """A ``select_*`` variant of the dev sweep runs ``gradmm select`` with its floor (no
    selected text has fewer words) and records dev accuracy and quality, never test accuracy."""
    import sweep_gradmm

    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ntasks: [sst2]\nseeds: [0]\nn_per_class: 3\n"
        "synthetic_per_class: 2\ngenerate: {batch: 2}\n"
        "filter: {keep_per_class: 2, classifier: false}\n"
        "finetune: {steps: 2, batch_size: 2, eval_every: 1, lr: 0.001}\n"
    )
    small = {"select": {"pool": 6, "min_words": 3}}
    monkeypatch.setitem(sweep_gradmm.VARIANTS, "select_words_3", small)
    out = tmp_path / "sweep.json"
    argv = ["sweep_gradmm.py", "--config", str(spec), "--data-dir", str(data_dir)]
    monkeypatch.setattr(sys, "argv", [*argv, "--variants", "select_words_3", "--out", str(out)])
    sweep_gradmm.main()
    record = json.loads(out.read_text())["variants"]["select_words_3"]
    assert record["options"] == small["select"]
    assert 0 <= record["best_dev_accuracy"] <= 1 and "test_accuracy" not in json.dumps(record)
    run = tmp_path / "sweep_work/cells/sst2/sweep_select_words_3/seed0/run"
    texts = read_jsonl(run / "synthetic.jsonl")
    assert len(texts) == 4 and all(len(r["text"].split()) >= 3 for r in texts)
