import json
import random

import torch
from conftest import tiny_run
from typer.testing import CliRunner

from gradmm.cli import app
from gradmm.privacy.audit import SubstringIndex, jaccard


def brute_force_lcs(tokens, pool):
    best = 0
    for seq in pool:
        for i in range(len(tokens)):
            for j in range(len(seq)):
                k = 0
                while i + k < len(tokens) and j + k < len(seq) and tokens[i + k] == seq[j + k]:
                    k += 1
                best = max(best, k)
    return best


def test_longest_common_run_equals_brute_force():
    rng = random.Random(0)
    for alphabet in (2, 3, 6):  # small alphabets: many repeats, clones and shared starts
        pool = [[rng.randrange(alphabet) for _ in range(rng.randint(1, 12))] for _ in range(5)]
        pool.append(list(pool[0]))  # a repeated sequence
        pool.append(pool[1][:3])  # a prefix of another
        index = SubstringIndex(pool)
        for _ in range(200):
            toks = [rng.randrange(alphabet) for _ in range(rng.randint(0, 15))]
            assert index.longest_common_run(toks) == brute_force_lcs(toks, pool)
    assert jaccard({1, 2}, {2, 3}) == 1 / 3


def test_substring_index_is_linear_in_the_texts():
    """A set of every n-gram of a 20,000-token text holds 2 x 10^8 tuples (the audit hung on a
    folder of long texts); the automaton has fewer than two states per token."""
    rng = random.Random(1)
    long_text = [rng.randrange(50) for _ in range(20_000)]
    index = SubstringIndex([long_text, long_text[5000:9000]])
    assert len(index.next) < 2 * 24_000
    assert index.longest_common_run(long_text[100:3100]) == 3000
    assert index.longest_common_run([99, 98]) == 0


def test_audit_command_writes_statistics_only(model_dirs, data_dir, tmp_path):
    runner = CliRunner()
    _, run = tiny_run(tmp_path, model_dirs["llama"], data_dir)
    r = runner.invoke(app, ["audit", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    # the report is private: beside the run folder, never inside it, and labelled so
    assert not (run / "audit.json").exists()
    audit = json.loads((run.parent / "run.audit.json").read_text())
    assert audit["private"] is True and "PRIVATE" in audit["label"]
    assert audit["data_read"][0]["private"] and not audit["data_read"][0]["covered_by_dp"]
    assert audit["pool"]["examples"] == 6 and len(audit["examples"]) == 4
    assert set(audit["examples"][0]) == {"id", "longest_common_ngram", "nearest_jaccard"}
    # never into the run folder, never over a file it did not write, never twice silently
    r = runner.invoke(
        app, ["audit", str(run), "--data-dir", str(data_dir), "--out", str(run / "a.json")]
    )
    assert r.exit_code == 2 and "inside the run folder" in r.stderr
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    r = runner.invoke(app, ["audit", str(run), "--data-dir", str(data_dir), "--out", str(foreign)])
    assert r.exit_code == 2 and "not written by gradmm audit" in r.stderr
    assert foreign.read_text() == '{"mine": 1}'
    r = runner.invoke(app, ["audit", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert (
        runner.invoke(
            app, ["audit", str(run), "--data-dir", str(data_dir), "--overwrite"]
        ).exit_code
        == 0
    )


def test_roc_auc_counts_pairs():
    from gradmm.privacy.audit import roc_auc

    assert roc_auc([3, 2], [1, 2]) == 3.5 / 4
    assert roc_auc([1], [2]) == 0.0 and roc_auc([5, 6], [1]) == 1.0


def test_membership_test_on_a_finetuned_model(model_dirs, data_dir, tmp_path):
    runner = CliRunner()
    _, run = tiny_run(tmp_path, model_dirs["llama"], data_dir)
    (run / "train.jsonl").write_text((run / "synthetic.jsonl").read_text())
    r = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(model_dirs["llama"]),
            "--task",
            "sst2",
            "--train",
            str(run / "train.jsonl"),
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path / "ft"),
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--save-model",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "audit",
            str(run),
            "--data-dir",
            str(data_dir),
            "--finetuned",
            str(tmp_path / "ft" / "model"),
        ],
    )
    assert r.exit_code == 0, r.output
    mia = json.loads((run.parent / "run.audit.json").read_text())["membership_inference"]
    assert mia["members"] == mia["non_members"] == 6 and mia["model"] == str(tmp_path / "ft/model")


def test_membership_auc_predicts_members_by_low_loss(model_dirs, data_dir):
    """The attack's direction and ties, against losses computed here: the rows the model fits
    best, as members, against those it fits worst score 1; the reverse 0; a set against itself
    0.5 (every pair a tie)."""
    from gradmm.core.tokens import tokenize_prompt
    from gradmm.data.tasks import BUILTIN_TASKS, load_examples
    from gradmm.models.loading import load_model
    from gradmm.privacy.audit import membership_auc
    from gradmm.stages.evaluate import label_log_probs

    task = BUILTIN_TASKS["sst2"]
    examples = load_examples(task, "validation", data_dir)
    rows = list(range(12))
    lm = load_model(str(model_dirs["llama"]))
    with torch.no_grad():
        scores = label_log_probs(lm, tokenize_prompt(task, lm.tokenizer), examples.texts[:12])
    loss = torch.nn.functional.cross_entropy(
        scores, torch.tensor(examples.labels[:12]), reduction="none"
    )
    order = [rows[i] for i in loss.argsort().tolist()]
    fit, unfit = order[:6], order[6:]
    model = str(model_dirs["llama"])
    assert membership_auc(model, task, examples, fit, unfit) == 1.0
    assert membership_auc(model, task, examples, unfit, fit) == 0.0
    assert membership_auc(model, task, examples, fit, fit) == 0.5
