import json
import random

from typer.testing import CliRunner

from gradmm.audit import jaccard, longest_common_ngram, ngram_index
from gradmm.cli import app


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


def test_longest_common_ngram_equals_brute_force():
    rng = random.Random(0)
    pool = [[rng.randrange(6) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    index = ngram_index(pool)
    for _ in range(200):
        toks = [rng.randrange(6) for _ in range(rng.randint(0, 15))]
        assert longest_common_ngram(toks, index) == brute_force_lcs(toks, pool)
    assert jaccard({1, 2}, {2, 3}) == 1 / 3


def test_audit_command_writes_statistics_only(model_dirs, data_dir, tmp_path):
    runner = CliRunner()
    rel, run = tmp_path / "rel", tmp_path / "run"
    assert (
        runner.invoke(
            app,
            [
                "release",
                "--task",
                "sst2",
                "--model",
                str(model_dirs["llama"]),
                "--data-dir",
                str(data_dir),
                "--out",
                str(rel),
                "--n-per-class",
                "3",
            ],
        ).exit_code
        == 0
    )
    assert (
        runner.invoke(
            app,
            [
                "generate",
                "--release",
                str(rel),
                "--out",
                str(run),
                "--per-class",
                "2",
                "--batch",
                "2",
                "--length",
                "5",
                "--steps",
                "1",
                "--inner-steps",
                "1",
                "--init-candidates",
                "2",
                "--quiet",
            ],
        ).exit_code
        == 0
    )
    r = runner.invoke(app, ["audit", str(run)])
    assert r.exit_code == 0, r.output
    audit = json.loads((run / "audit.json").read_text())
    assert audit["pool"]["examples"] == 6 and len(audit["examples"]) == 4
    assert set(audit["examples"][0]) == {"id", "longest_common_ngram", "nearest_jaccard"}
