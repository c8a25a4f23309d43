import json

import torch
from conftest import tiny_run
from typer.testing import CliRunner

from gradmm.cli import app
from gradmm.core.matching import MatchingLoss
from gradmm.core.tokens import LabelTokens, encode_text
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.filtering import balance_by_mean, per_example_rec
from gradmm.stages.record import load_release_model
from gradmm.stages.release import release_targets


def test_balance_drops_worst_until_means_agree():
    rows = {0: [{"l": 0.1}, {"l": 0.9}, {"l": 0.2}], 1: [{"l": 0.3}, {"l": 0.3}]}
    out = balance_by_mean(rows, "l")
    assert [r["l"] for r in out[0]] == [0.1, 0.2] and len(out[1]) == 2


def test_per_example_loss_equals_matching_loss_of_a_batch_of_one(model_dirs, data_dir, tmp_path):
    cfg = ReleaseConfig(
        task="sst2", model=str(model_dirs["phi"]), n_per_class=3, data_dir=str(data_dir)
    )
    rel = release_targets(cfg, tmp_path / "rel")
    lm = load_release_model(rel)
    texts, labels = ["the film was great", "a dull plot"], [1, 0]
    ours = per_example_rec(lm, rel, texts, labels)
    loss = MatchingLoss(
        rel.target_weight, rel.target_bias, lm.output, LabelTokens.of(rel.prompt.label_ids)
    )
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        ids = torch.tensor(rel.prompt.encode(lm.tokenizer, t))
        x = lm.embeddings[ids][None, None]
        ref = loss.rec(lm.model, x, torch.tensor([y]))
        torch.testing.assert_close(ours[i], ref[0], rtol=1e-4, atol=1e-6)
    assert encode_text(lm.tokenizer, "x")


def test_filter_command_reports_each_stage(model_dirs, data_dir, tmp_path):
    runner = CliRunner()
    rel, run = tiny_run(tmp_path, model_dirs["llama"], data_dir, per_class=4, length=4, topk=3)
    rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
    rows.append({**rows[0], "id": 99})  # a duplicate
    (run / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["filter", str(run), "--keep-per-class", "2", "--no-classifier"])
    assert r.exit_code == 0, r.output
    report = json.loads((run / "filter_report.json").read_text())
    assert report["input"] == 9 and report["after_dedupe"] == 8
    assert report["after_top"] == 4 and report["after_balance"] <= 4
    kept = [json.loads(x) for x in (run / "filtered.jsonl").read_text().splitlines()]
    assert len(kept) == report["after_balance"]
    from gradmm.stages.record import load_release

    release = load_release(rel)
    all_losses = per_example_rec(
        load_release_model(release),
        release,
        [r["text"] for r in rows[:8]],
        [r["label"] for r in rows[:8]],
    )
    for c in (0, 1):
        losses = sorted(
            round(float(v), 6) for r, v in zip(rows[:8], all_losses, strict=True) if r["label"] == c
        )
        mine = sorted(r["example_rec_loss"] for r in kept if r["label"] == c)
        assert mine == losses[: len(mine)]


def test_filter_warns_when_a_class_is_left_empty(model_dirs, data_dir, tmp_path):
    _, run = tiny_run(tmp_path, model_dirs["llama"], data_dir, per_class=2, length=4, topk=3)
    rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
    only_positive = [r for r in rows if r["label"] == 1]
    (run / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in only_positive))
    r = CliRunner().invoke(app, ["filter", str(run), "--no-classifier"])
    assert r.exit_code == 0, r.output
    assert "gradmm: warning: the filter kept no text of class negative" in r.stderr
    assert json.loads((run / "filter_report.json").read_text())["per_class"]["negative"] == 0
