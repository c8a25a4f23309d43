"""The command line end to end, and every bad input it must refuse with one line and status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, release_args, write_split
from typer.testing import CliRunner

from gradmm.cli import app

runner = CliRunner()
SMALL = [
    "--per-class",
    "4",
    "--batch",
    "2",
    "--length",
    "5",
    "--steps",
    "2",
    "--inner-steps",
    "3",
    "--topk",
    "10",
    "--init-candidates",
    "4",
    "--quiet",
]
SHARED_DATA = Path(os.environ.get("GRADMM_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("task, n_classes", [("sst2", 2), ("tweet_emotion", 4)])
def test_release_then_generate(task, n_classes, model_dirs, data_dir, tmp_path):
    r = invoke(*release_args(model_dirs["llama"], data_dir, tmp_path / "rel", task=task, n=3))
    assert r.exit_code == 0, r.output
    r = invoke("generate", "--release", tmp_path / "rel", "--out", tmp_path / "run", *SMALL)
    assert r.exit_code == 0, r.output
    rows = read_rows(tmp_path / "run" / "synthetic.jsonl")
    assert [sum(row["label"] == c for row in rows) for c in range(n_classes)] == [4] * n_classes
    for row in rows:
        assert set(row) >= {"text", "label", "label_name", "problem", "rec_loss", "perplexity"}
        assert isinstance(row["text"], str) and row["text"]
        assert 0 <= row["rec_loss"] <= 2 and row["perplexity"] > 1
    assert len({row["problem"] for row in rows}) == 2 * n_classes
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["per_class"] == 4 and manifest["seeds"]["seed"] == 0
    assert {"init", "x_steps", "projection", "total"} <= set(manifest["timings_s"])
    assert sorted(os.listdir(tmp_path / "run")) == [
        ".gradmm.json",
        "manifest.json",
        "synthetic.jsonl",
    ]


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="shared/data not present")
def test_console_script_on_shared_data_layout(model_dirs, tmp_path):
    env = {**os.environ, "GRADMM_DATA_DIR": str(SHARED_DATA)}
    gradmm = [sys.executable, "-m", "gradmm.cli"]
    subprocess.run(
        [
            *gradmm,
            "release",
            "--task",
            "sst2",
            "--model",
            model_dirs["gpt2"],
            "--out",
            tmp_path / "rel",
            "--n-per-class",
            "5",
        ],
        env=env,
        check=True,
    )
    subprocess.run(
        [*gradmm, "generate", "--release", tmp_path / "rel", "--out", tmp_path / "run", *SMALL],
        env=env,
        check=True,
    )
    rows = read_rows(tmp_path / "run" / "synthetic.jsonl")
    assert [row["label_name"] for row in rows] == ["negative"] * 4 + ["positive"] * 4


def test_bad_inputs_give_one_line_and_status_2(model_dirs, data_dir, tmp_path):
    model = model_dirs["llama"]
    out = tmp_path / "rel"
    bad = tmp_path / "bad"

    one_line_error(invoke(*release_args(model, data_dir, out, task="nope")), "unknown task")
    one_line_error(invoke(*release_args(model, tmp_path / "empty", out)), "data folder not found")
    (bad / "sst2").mkdir(parents=True)
    one_line_error(invoke(*release_args(model, bad, out)), "data file not found")
    write_split(bad / "sst2", "train", [("fine", 1)])
    with (bad / "sst2" / "train.jsonl").open("a") as f:
        f.write('{"text": "broken", "label": \n')
    one_line_error(invoke(*release_args(model, bad, out)), "train.jsonl:2", "malformed")
    write_split(bad / "sst2", "train", [("fine", 1), ("odd", 5)])
    one_line_error(invoke(*release_args(model, bad, out)), "train.jsonl:2", "label 5 outside")
    write_split(bad / "sst2", "train", [("fine", 1), ("", 0)])
    one_line_error(invoke(*release_args(model, bad, out)), "train.jsonl:2", "empty text")
    write_split(bad / "sst2", "train", [("fine", 1), ("dull", 0), ("good", 1)])
    one_line_error(invoke(*release_args(model, bad, out, n=2)), "'negative'", "fewer than the 2")

    spec = tmp_path / "t.yaml"
    spec.write_text(
        f"label_names: [a, b]\nlabel_words: [' bad', ' great']\n"
        f"template: 'no slot'\nlocal_dir: {data_dir / 'sst2'}\n"
    )
    one_line_error(invoke(*release_args(model, data_dir, out, task=spec)), "text slot")
    spec.write_text(
        f"label_names: [a, b]\nlabel_words: [' bad', ' great']\nlocal_dir: {data_dir / 'sst2'}\n"
        "label_token_policy: single\n"  # a policy of older versions
    )
    one_line_error(invoke(*release_args(model, data_dir, out, task=spec)), "label_token_policy")
    one_line_error(
        invoke(*release_args(tmp_path / "no-model", data_dir, out)), "model folder not found"
    )
    assert not out.exists()

    assert invoke(*release_args(model, data_dir, out)).exit_code == 0
    one_line_error(invoke(*release_args(model, data_dir, out)), "already holds a release")
    run = tmp_path / "run"
    assert invoke("generate", "--release", out, "--out", run, *SMALL).exit_code == 0
    one_line_error(
        invoke("generate", "--release", out, "--out", run, *SMALL), "already holds a finished run"
    )
    assert invoke("generate", "--release", out, "--out", run, *SMALL, "--overwrite").exit_code == 0
    one_line_error(
        invoke("generate", "--release", tmp_path / "none", "--out", tmp_path / "r2"),
        "no release found",
    )
    one_line_error(
        invoke(
            "generate",
            "--release",
            out,
            "--out",
            tmp_path / "r3",
            "--per-class",
            "5",
            "--batch",
            "2",
        ),
        "multiple of --batch",
    )
    one_line_error(
        invoke("generate", "--release", out, "--out", tmp_path / "r4", "--rho", "-1"), "rho"
    )
    assert not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradmm.cli",
            "release",
            "--task",
            "nope",
            "--model",
            "x/y/z",
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "gradmm: error: unknown task 'nope' (built-in: imdb, "
        "rotten_tomatoes, sst2, tweet_emotion; or a .yaml task file)"
    )


def test_unfinished_run_with_other_settings_is_not_resumed(model_dirs, data_dir, tmp_path):
    assert invoke(*release_args(model_dirs["llama"], data_dir, tmp_path / "rel")).exit_code == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock.json").write_text('{"config_sha256": "something else"}')
    (run / ".gradmm.json").write_text('{"kind": "run"}')  # an interrupted gradmm run
    one_line_error(
        invoke("generate", "--release", tmp_path / "rel", "--out", run, *SMALL),
        "unfinished run with different settings",
    )
    assert (
        invoke(
            "generate", "--release", tmp_path / "rel", "--out", run, *SMALL, "--overwrite"
        ).exit_code
        == 0
    )


def test_sharded_run_equals_its_blocks_solved_alone(model_dirs, data_dir, tmp_path):
    """What --nproc guarantees: rank r solves its contiguous block exactly as a 1-process run of
    that block alone (same threads) would, and rank 0 writes the blocks in problem order. (Not
    that --nproc 2 equals --nproc 1: rounding in differently shaped batched kernels may change
    a token; README, "Several processes".)"""
    from gradmm.core.distributed import shard
    from gradmm.stages.configs import GenerateConfig
    from gradmm.stages.generate import build_solver
    from gradmm.stages.record import load_release, load_release_model

    assert (
        invoke(*release_args(model_dirs["llama"], data_dir, tmp_path / "rel", n=3)).exit_code == 0
    )
    options = {
        "per_class": 6,
        "batch": 2,
        "length": 5,
        "steps": 3,
        "inner_steps": 3,
        "topk": 10,
        "init_candidates": 4,
    }
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
    r = invoke(
        "generate",
        "--release",
        tmp_path / "rel",
        "--out",
        tmp_path / "two",
        *flags,
        "--nproc",
        2,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert sorted(os.listdir(tmp_path / "two")) == [
        ".gradmm.json",
        "manifest.json",
        "synthetic.jsonl",
    ]

    release = load_release(tmp_path / "rel")
    lm = load_release_model(release)
    cfg = GenerateConfig(**options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the 2 ranks used on this machine
    try:
        texts = []
        for rank in range(2):
            solver, problems, _ = build_solver(lm, release, cfg)
            mine = shard(len(problems), rank, 2)
            block = problems[mine.start : mine.stop]
            ids = solver.solve(block, None, progress=False).ids
            texts += [lm.tokenizer.decode(seq.tolist()).strip() for seq in ids.flatten(0, 1)]
    finally:
        torch.set_num_threads(threads)
    assert [row["text"] for row in read_rows(tmp_path / "two" / "synthetic.jsonl")] == texts


def test_initialisation_does_not_depend_on_how_problems_are_grouped(model_dirs, data_dir, tmp_path):
    from gradmm.stages.configs import GenerateConfig
    from gradmm.stages.generate import build_solver
    from gradmm.stages.record import load_release, load_release_model

    assert (
        invoke(*release_args(model_dirs["llama"], data_dir, tmp_path / "rel", n=3)).exit_code == 0
    )
    release = load_release(tmp_path / "rel")
    lm = load_release_model(release)
    cfg = GenerateConfig(**{"per_class": 6, "batch": 2, "length": 5, "init_candidates": 20})
    solver, problems, _ = build_solver(lm, release, cfg)
    together = solver.initialise(problems)
    for p in range(len(problems)):
        alone = solver.initialise(problems[p : p + 1])
        assert torch.equal(alone[0], together[p])


def test_generate_options_come_from_the_settings_fields(monkeypatch, tmp_path):
    """Each generate option is defined once (the GenerateConfig field): the CLI's flags, help and
    defaults are generated from the fields, a flag reaches the config, and the config the CLI
    builds from flags and --config equals the one built directly in Python."""
    from gradmm.stages.configs import GenerateConfig

    out = " ".join(invoke("generate", "--help").output.split())  # unwrapped
    for name, field in GenerateConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in out and field.description.split()[0] in out
    assert "[24; paper: 27]" in out and "[200]" in out  # defaults, and the preset's
    assert GenerateConfig().length == 24 and GenerateConfig(preset="paper").length == 27

    seen = {}

    def fake_generate(release, out, cfg, **kwargs):
        seen["cfg"] = cfg
        return out / "synthetic.jsonl"

    monkeypatch.setattr("gradmm.stages.generate.generate", fake_generate)
    r = invoke("generate", "--release", "r", "--out", "o", "--patience", 3, "--topk", 7)
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == GenerateConfig(patience=3, topk=7)
    assert (seen["cfg"].length, seen["cfg"].select) == (24, "projected")
    assert invoke("generate", "--release", "r", "--out", "o", "--preset", "paper").exit_code == 0
    assert seen["cfg"] == GenerateConfig(preset="paper")
    assert (seen["cfg"].length, seen["cfg"].select) == (27, "augmented")
    # the file's keys (dashes or underscores) under the flags, the preset under both
    (tmp_path / "g.yaml").write_text("preset: paper\nper-class: 6\nbatch: 3\nlength: 9\n")
    config = tmp_path / "g.yaml"
    r = invoke("generate", "--release", "r", "--out", "o", "--config", config, "--length", 11)
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == GenerateConfig(preset="paper", per_class=6, batch=3, length=11)


CONFIG_OF_COMMAND = {
    "release": "ReleaseConfig",
    "filter": "FilterConfig",
    "select": "SelectConfig",
    "finetune": "FinetuneConfig",
    "evaluate": "EvaluateConfig",
    "privacy": "NoiseQuery",
    "audit": "AuditConfig",
    "canary-audit": "CanaryAuditConfig",
    "lm train": "LMTrainConfig",
}


@pytest.mark.parametrize("command", CONFIG_OF_COMMAND)
def test_every_command_has_a_flag_per_config_field(command):
    """filter, evaluate, audit and privacy too: no hand-written flag can drift from its field."""
    from gradmm import cli as cli_module

    model = getattr(cli_module, CONFIG_OF_COMMAND[command])
    skipped = {"release": {"canary_file"}, "canary-audit": {"release", "generate"}}
    out = invoke(*command.split(), "--help").output
    for name in set(model.model_fields) - skipped.get(command, set()):
        assert f"--{name.replace('_', '-')}" in out, (command, name)


def test_options_reference_is_current():
    """docs/options.md is generated from the commands; regenerate it when an option changes."""
    from gradmm.cli import options_reference

    committed = (Path(__file__).parents[1] / "docs/options.md").read_text()
    assert committed == options_reference(), "regenerate docs/options.md (see its first line)"


def test_python_api_runs_with_a_config_built_in_python(model_dirs, data_dir, tmp_path):
    """``GenerateConfig(per_class=...)`` is complete on its own (it used to end in a pydantic
    error until a resolver filled four fields), and ``gradmm.generate`` writes what the command
    writes for the same options."""
    import gradmm

    rel = tmp_path / "rel"
    assert invoke(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    r = invoke("generate", "--release", rel, "--out", tmp_path / "cli", *SMALL)
    assert r.exit_code == 0, r.output
    flags = dict(zip(SMALL[:-1:2], SMALL[1::2], strict=True))
    config = gradmm.GenerateConfig(**{k[2:].replace("-", "_"): int(v) for k, v in flags.items()})
    written = gradmm.generate(rel, tmp_path / "api", config, progress=False)
    assert written.read_bytes() == (tmp_path / "cli" / "synthetic.jsonl").read_bytes()


def test_generate_builds_the_solver_once(model_dirs, data_dir, tmp_path, monkeypatch):
    """build_solver decodes the whole vocabulary: one process builds it once (it used to build
    it to validate the settings, then again to solve)."""
    import gradmm.stages.generate as generate_module

    built = []
    build = generate_module.build_solver

    def counting(*args, **kwargs):
        built.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(generate_module, "build_solver", counting)
    rel = tmp_path / "rel"
    assert invoke(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    r = invoke("generate", "--release", rel, "--out", tmp_path / "run", *SMALL)
    assert r.exit_code == 0, r.output
    assert len(built) == 1


def test_generate_from_the_lms_own_text(model_dirs, data_dir, tmp_path):
    """--init lm end to end: the manifest records the init and its K."""
    rel = tmp_path / "rel"
    assert invoke(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    args = ["generate", "--release", rel, "--out", tmp_path / "run", *SMALL, "--init", "lm"]
    r = invoke(*args, "--init-candidates", 2)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["init"] == "lm" and manifest["config"]["init_candidates"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "synthetic.jsonl").open()]
    assert len(rows) == 8 and all(row["text"] for row in rows)


def test_select_writes_a_run_that_filter_reads(model_dirs, data_dir, tmp_path):
    """gradmm select: per class the N sampled texts whose set matches the release, its loss
    recorded as MatchingLoss computes it on that batch; filter reads the run like generate's."""
    from gradmm.core.tokens import label_hidden
    from gradmm.stages.filtering import release_loss
    from gradmm.stages.record import load_release, load_release_model

    rel, run = tmp_path / "rel", tmp_path / "run"
    assert invoke(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    options = ["--pool", 6, "--per-class", 3, "--min-words", 1, "--quiet"]
    r = invoke("select", "--release", rel, "--out", run, *options)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "synthetic.jsonl").open()]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [row["label"] for row in rows] == [0, 0, 0, 1, 1, 1]
    release = load_release(rel)
    lm = load_release_model(release)
    loss = release_loss(lm, release)
    for c, name in enumerate(release.task.label_names):
        texts = [row["text"] for row in rows if row["label"] == c]
        seqs = [release.prompt.encode(lm.tokenizer, text) for text in texts]
        with torch.no_grad():
            h = label_hidden(lm, loss.labels, seqs, [c] * 3)
        direct = float(loss(h[None], torch.tensor([c]))[0])
        assert manifest["per_class"][name]["rec_loss"] == pytest.approx(direct, abs=2e-6)
    assert manifest["data_read"][0]["data"].startswith("release ")
    r = invoke("filter", run, "--no-classifier", "--keep-per-class", 2)
    assert r.exit_code == 0, r.output
    assert invoke("select", "--release", rel, "--out", run, *options).exit_code == 2  # finished
    r = invoke("select", "--release", rel, "--out", tmp_path / "x", "--pool", 2, "--per-class", 3)
    assert r.exit_code == 2 and "must be at least" in r.stderr
