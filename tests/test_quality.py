"""The quality measure of a training set: matching loss, label fidelity by the judge, distinct-2,
and the judge slice that no private pool may read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, release_args

from gradmm.data.pools import private_pool, private_pool_exclusions
from gradmm.data.tasks import dev_indices, judge_indices, load_examples, load_task
from gradmm.stages.quality import distinct_n, matching_loss, set_quality, train_judge


def judged_task(tmp_path, data_dir, judge_size=20):
    """sst2's fixture data as a task file with a dev slice of 10 and a judge slice."""
    path = tmp_path / "judged.yaml"
    path.write_text(
        "label_names: [negative, positive]\n"
        'label_words: [" bad", " great"]\n'
        'template: "Review: {text} Sentiment:"\n'
        f"local_dir: {data_dir / 'sst2'}\n"
        "test_split: validation\n"
        f"dev_size: 10\njudge_size: {judge_size}\n"
    )
    return path


def test_judge_slice_follows_dev_and_no_pool_reads_it(tmp_path, data_dir):
    task = load_task(str(judged_task(tmp_path, data_dir)))
    split = load_examples(task, "train")
    dev = dev_indices(split, 10)
    judge = judge_indices(split, 10, 20)
    assert len(judge) == 20 and not set(dev) & set(judge)
    # dev and judge are one prefix of the keyed ranking: the dev slice of 30 is their union
    assert sorted(dev + judge) == dev_indices(split, 30)
    assert private_pool_exclusions(task, "train", split) == sorted(dev + judge)
    for seed in range(5):
        _, picked = private_pool(task, "train", 5, seed, None)
        assert not {i for ix in picked for i in ix} & set(judge + dev)
    # capped with the dev slice at half the split (80 rows)
    assert len(judge_indices(split, 10, 1000)) == 30


def test_distinct_2():
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) twice
    assert distinct_n(["A b", "a B"]) == 0.5
    assert distinct_n(["one"]) == 0.0


def test_label_fidelity_of_flipped_labels_is_its_complement(tmp_path, data_dir):
    """Binary task: every text the judge gets right under its label it gets wrong flipped; the
    judge is trained on the judge slice only and scores the fixture's separable classes well."""
    task = load_task(str(judged_task(tmp_path, data_dir, judge_size=30)))
    judge = train_judge(task, None)
    assert judge.train_rows == 30 and judge.test_accuracy > 0.8
    split = load_examples(task, "train")
    rows = [{"text": t, "label": y} for t, y in zip(split.texts, split.labels, strict=True)][:40]
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]
    q, qf = (set_quality(_lm(), task, r, None) for r in (rows, flipped))
    assert q["label_fidelity"] + qf["label_fidelity"] == pytest.approx(1.0)
    assert q["matching_loss"] is None and q["data_read"][0]["covered_by_dp"] is False


def test_no_judge_without_a_slice(data_dir):
    task = load_task("sst2")  # the fixture's 80 rows: the dev slice is half of them
    assert train_judge(task, str(data_dir)) is None
    assert (
        set_quality(_lm(), task, [{"text": "a b", "label": 0}], str(data_dir))["label_fidelity"]
        is None
    )


def _lm():
    from gradmm.models.loading import load_model

    return load_model(_lm.path)


@pytest.fixture(autouse=True)
def _model(model_dirs):
    _lm.path = str(model_dirs["llama"])


def test_matching_loss_is_the_mean_of_batch_losses(model_dirs, data_dir, tmp_path):
    """Against MatchingLoss on each batch of 10 in file order, one class at a time."""
    from gradmm.core.tokens import label_hidden
    from gradmm.stages.filtering import release_loss
    from gradmm.stages.record import load_release, load_release_model

    rel = tmp_path / "rel"
    assert cli(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    release = load_release(rel)
    lm = load_release_model(release)
    split = load_examples(release.task, "train", data_dir)
    rows = [{"text": t, "label": y} for t, y in zip(split.texts, split.labels, strict=True)]
    rows = rows[:25] + rows[40:52]  # 25 negative (batches 10, 10, 5), 12 positive (10, 2)
    loss = release_loss(lm, release)
    direct = []
    for c in (0, 1):
        texts = [r["text"] for r in rows if r["label"] == c]
        for k in range(0, len(texts), 10):
            seqs = [release.prompt.encode(lm.tokenizer, t) for t in texts[k : k + 10]]
            with torch.no_grad():
                h = label_hidden(lm, loss.labels, seqs, [c] * len(seqs))
            direct.append(float(loss(h[None], torch.tensor([c]))[0]))
    assert matching_loss(lm, release, rows) == pytest.approx(sum(direct) / 5, abs=1e-5)


def test_quality_command(model_dirs, data_dir, tmp_path):
    rel, data = tmp_path / "rel", tmp_path / "set.jsonl"
    assert cli(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    data.write_text(
        "".join(json.dumps({"text": f"w{i} x y", "label": i % 2}) + "\n" for i in range(6))
    )
    r = cli("quality", "--data", data, "--release", rel, "--data-dir", data_dir)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["examples"] == 6 and report["per_class"] == [3, 3]
    assert 0 <= report["matching_loss"] <= 2 and report["distinct_2"] == pytest.approx(
        7 / 12, abs=1e-4
    )
    r = cli("quality", "--data", data, "--data-dir", data_dir)
    assert r.exit_code == 2 and "--model and --task" in r.stderr
    assert not list(tmp_path.glob("*.quality*"))  # writes nothing
