"""Canary audit (membership inference from the synthetic text alone): the n-gram model against
counts by hand, TPR at low FPR, an attack that must succeed on leaky text and fail on
independent text, and the audit end to end with its canaries planted in the release."""

import json
import math

import numpy as np
import pytest
from conftest import cli, one_line_error

from gradmm.data.tasks import BUILTIN_TASKS, load_examples
from gradmm.models.loading import load_model
from gradmm.privacy.canary import CanaryAuditConfig, NgramModel, attack, make_canaries, tpr_at_fpr


def test_bigram_model_is_counting_with_add_one():
    model = NgramModel([[1, 2, 3], [1, 2, 2]], n=2, vocab_size=5)
    # P(2 | 1) = (count(1,2) + 1) / (count(1,·) + 5) = 3 / 7
    assert model.log_prob([7, 1], 2) == pytest.approx(math.log(3 / 7))
    assert model.log_prob([], 1) == pytest.approx(math.log(3 / 7))  # start of sequence
    total = sum(math.exp(model.log_prob([2], t)) for t in range(5))
    assert total == pytest.approx(1.0)  # a distribution over the vocabulary
    # P(3 | 2) = (count(2,3) + 1) / (count(2,·) + 5) = 2 / 7
    assert model.score([1], [2, 3]) == pytest.approx((math.log(3 / 7) + math.log(2 / 7)) / 2)
    # the scored bigrams (1,2) and (2,3) both occur; of (1,4), (4,2) neither does
    assert model.seen_fraction([1], [2, 3]) == 1.0
    assert model.seen_fraction([1], [4, 2]) == 0.0
    assert model.seen_fraction([3], [2, 2]) == 0.5  # (3,2) no, (2,2) yes


def test_tpr_at_fpr():
    others = list(range(100))  # non-members score 0..99
    members = [99.5, 98.5, 50]
    assert tpr_at_fpr(members, others, 0.0) == pytest.approx(1 / 3)  # above every non-member
    assert tpr_at_fpr(members, others, 0.01) == pytest.approx(2 / 3)  # above all but 99
    assert tpr_at_fpr(members, others, 0.1) == pytest.approx(2 / 3)
    assert tpr_at_fpr(members, others, 0.5) == pytest.approx(1.0)


def test_attack_detects_leaky_text_and_not_independent_text(model_dirs, data_dir):
    lm = load_model(str(model_dirs["llama"]))
    task = BUILTIN_TASKS["sst2"]
    ex = load_examples(task, "train", data_dir)
    cfg = CanaryAuditConfig(release={}, canaries=30, suffix_tokens=6)
    canaries = make_canaries(task, lm.tokenizer, ex.texts, list(range(len(ex.texts))), cfg)
    assert len({c["text"] for c in canaries}) == 30
    planted = [i % 2 == 0 for i in range(30)]
    leaky = [c["text"] for c, p in zip(canaries, planted, strict=True) if p] + ex.texts[:20]
    leaky_report = attack(canaries, planted, leaky, lm.tokenizer, 2)
    assert leaky_report["roc_auc"] == 1.0
    assert leaky_report["suffix_ngrams_seen_members"] == 1.0  # every planted suffix echoed
    assert leaky_report["suffix_ngrams_seen_non_members"] < 0.2
    rng = np.random.default_rng(0)
    aucs = [
        attack(canaries, list(rng.permutation(planted)), ex.texts, lm.tokenizer, 2)["roc_auc"]
        for _ in range(20)
    ]
    assert 0.4 < float(np.mean(aucs)) < 0.6


def test_canary_audit_end_to_end(model_dirs, data_dir, tmp_path):
    spec = tmp_path / "canary.yaml"
    spec.write_text(
        f"release: {{task: sst2, model: {model_dirs['llama']}, n_per_class: 4, "
        f"data_dir: {data_dir}}}\n"
        "generate: {per_class: 4, batch: 2, length: 5, steps: 1, inner_steps: 2, "
        "init_candidates: 2, topk: 5}\ncanaries: 12\nsuffix_tokens: 4\n"
    )
    r = cli("canary-audit", "--config", spec, "--out", tmp_path / "audit", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["private"] and report["members"] == report["non_members"] == 6
    assert report["planted"] == "every planted canary is in the pool"
    assert 0 <= report["roc_auc"] <= 1
    release = json.loads((tmp_path / "audit" / "release" / "release.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "audit" / "canaries.jsonl").read_text().splitlines()]
    planted = [sum(r["planted"] and r["label"] == c for r in rows) for c in range(2)]
    assert release["counts"] == [4 + planted[0], 4 + planted[1]]
    assert "canary_file" not in release["config"]  # a local path is never recorded
    r = cli("canary-audit", "--config", spec, "--out", tmp_path / "audit", "--quiet")
    assert r.exit_code == 0
    assert json.loads((tmp_path / "audit" / "report.json").read_text()) == report


def test_audit_of_a_canary_audit_run_audits_the_released_pool(model_dirs, data_dir, tmp_path):
    """The release of a canary audit pooled 4 real rows per class and the planted canaries:
    `gradmm audit` of its run must audit exactly those (it once rebuilt a pool of counts[0]
    real rows and no canaries, and passed its own size check)."""
    from gradmm.data.pools import private_pool
    from gradmm.data.tasks import load_task

    spec = tmp_path / "canary.yaml"
    spec.write_text(
        f"release: {{task: sst2, model: {model_dirs['llama']}, n_per_class: 4, "
        f"data_dir: {data_dir}}}\n"
        "generate: {per_class: 2, batch: 2, length: 5, steps: 1, inner_steps: 1, "
        "init_candidates: 2, topk: 5}\ncanaries: 8\nsuffix_tokens: 4\n"
    )
    folder = tmp_path / "audit"
    assert cli("canary-audit", "--config", spec, "--out", folder, "--quiet").exit_code == 0
    planted = [json.loads(x) for x in (folder / "planted.jsonl").read_text().splitlines()]
    examples, picked = private_pool(load_task("sst2"), "train", 4, 0, str(data_dir))
    real = [examples.texts[i] for ix in picked for i in ix]
    # synthetic text that copies a planted canary and a real member: both must be found
    run = folder / "run"
    rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
    rows[0]["text"], rows[1]["text"] = planted[0]["text"], real[-1]
    (run / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run.audit.json"
    r = cli("audit", run, "--data-dir", data_dir, "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["pool"]["examples"] == 8 + len(planted)
    assert [e["nearest_jaccard"] for e in report["examples"][:2]] == [1.0, 1.0]
    # the release alone, away from its canary folder, cannot be audited: say where the rows are
    moved = tmp_path / "moved"
    (folder / "release").rename(moved)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["release"]["path"] = str(moved)
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = cli("audit", run, "--data-dir", data_dir, "--out", tmp_path / "again.json")
    one_line_error(r, "planted canary rows", "planted.jsonl")


def test_canary_audit_never_writes_into_a_folder_it_did_not_make(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    import gradmm.models.loading

    spec = tmp_path / "canary.yaml"
    spec.write_text(
        f"release: {{task: sst2, model: {model_dirs['llama']}, n_per_class: 4, "
        f"data_dir: {data_dir}}}\ncanaries: 8\n"
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("mine")
    (mine / "canaries.jsonl").write_text('{"text": "not yours", "label": 0, "planted": true}\n')
    one_line_error(
        cli("canary-audit", "--config", spec, "--out", mine), "not a gradmm canary-audit"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["canaries.jsonl", "report.json"]
    assert (mine / "report.json").read_text() == "mine"

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(gradmm.models.loading, "load_model", no_loading)
    for release, message in [
        ("epsilon: 1", "both --epsilon and --delta"),
        ("epsilon: 1, delta: 1.0e-5, match_params: last-block", "closed-form clipping"),
        ("clip: 2", "clip is a DP setting"),
        ("n_per_class: 0", "n_per_class"),
    ]:
        spec.write_text(f"release: {{task: sst2, model: {model_dirs['llama']}, {release}}}\n")
        one_line_error(cli("canary-audit", "--config", spec, "--out", tmp_path / "new"), message)
        assert not (tmp_path / "new").exists()
