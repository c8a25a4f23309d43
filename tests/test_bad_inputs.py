"""Bad input, as a new user and as an attacker try it: every case is one ``gradmm: error:`` line,
exit status 2, and nothing written. The table is where the next sweep starts: add a row per
finding. Below it, every command against a folder that is not gradmm's, and the signals."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cli, one_line_error, release_args, tiny_run

from gradmm.cli import app
from gradmm.stages.record import record_digest

SMALL = [
    "--per-class",
    2,
    "--batch",
    2,
    "--length",
    5,
    "--steps",
    1,
    "--inner-steps",
    1,
    "--init-candidates",
    2,
    "--topk",
    10,
    "--quiet",
]


@pytest.fixture(scope="module")
def env(model_dirs, data_dir, tmp_path_factory):
    """A finished release and run, and inputs broken in the ways of the table."""
    tmp = tmp_path_factory.mktemp("bad")
    rel, run = tiny_run(tmp, model_dirs["llama"], data_dir)
    (tmp / "latin1.yaml").write_bytes("label_names: [n, p]\n# caf\xe9\n".encode("latin-1"))
    (tmp / "broken.yaml").write_text("label_names: [n, p\nlabel_words: x\n")
    (tmp / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01\x00")
    bad_config = tmp / "bad-config"  # config.json says 48 hidden units, the weights hold 32
    bad_config.mkdir()
    for f in Path(model_dirs["llama"]).iterdir():
        (bad_config / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in Path(model_dirs["llama"]).iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    (tmp / "grid.yaml").write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0]\n"
        "methods: [zero_shot]\n"
    )
    other_data = tmp / "other-data"  # the same rows under another split file name
    (other_data / "sst2").mkdir(parents=True)
    (other_data / "sst2" / "labels.json").write_bytes((data_dir / "sst2/labels.json").read_bytes())
    rows = [json.loads(x) for x in (data_dir / "sst2/train.jsonl").read_text().splitlines()]
    (other_data / "sst2" / "train.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    )
    return SimpleNamespace(
        model=model_dirs["llama"],
        data=data_dir,
        tmp=tmp,
        rel=rel,
        run=run,
        bad_config=bad_config,
        no_tokenizer=no_tokenizer,
    )


def release_with(e, out, *extra):
    return [*release_args(e.model, e.data, e.tmp / out, n=3), *extra]


# (id, arguments given the env, what the one error line must say)
CASES = [
    (
        "task YAML not UTF-8",
        lambda e: release_with(e, "o", "--task", e.tmp / "latin1.yaml"),
        "not a UTF-8 text file",
    ),
    (
        "task YAML malformed",
        lambda e: release_with(e, "o", "--task", e.tmp / "broken.yaml"),
        "not valid YAML",
    ),
    ("negative seed", lambda e: release_with(e, "o", "--seed", -1), "seed"),
    ("clip without DP", lambda e: release_with(e, "o", "--clip", 2), "clip is a DP setting"),
    (
        "noise seed without DP",
        lambda e: release_with(e, "o", "--noise-seed", 3),
        "noise_seed is a DP setting",
    ),
    (
        "sketch seed without sketch",
        lambda e: release_with(e, "o", "--sketch-seed", 3),
        "sketch_seed is only for match_params sketch",
    ),
    (
        "sketch without its dimension",
        lambda e: release_with(e, "o", "--match-params", "sketch"),
        "match_params sketch needs sketch_dim",
    ),
    (
        "sketch larger than the model",
        lambda e: release_with(e, "o", "--match-params", "sketch", "--sketch-dim", 100000),
        "--sketch-dim 100000 is larger than the model's hidden size (32)",
    ),
    (
        "epsilon without bound",
        lambda e: release_with(e, "o", "--epsilon", 1e6, "--delta", 1e-5),
        "above 100",
    ),
    (
        "privacy epsilon without bound",
        lambda e: ["privacy", "--epsilon", 1e6, "--delta", 1e-5],
        "above 100",
    ),
    (
        "truncated GGUF",
        lambda e: [
            "evaluate",
            "--model",
            e.tmp / "trunc.gguf",
            "--task",
            "sst2",
            "--data-dir",
            e.data,
        ],
        "could not read GGUF file",
    ),
    (
        "config that does not fit the weights",
        lambda e: ["evaluate", "--model", e.bad_config, "--task", "sst2", "--data-dir", e.data],
        "does not match the shapes of its weights",
    ),
    (
        "missing tokenizer: the whole message",
        lambda e: ["evaluate", "--model", e.no_tokenizer, "--task", "sst2", "--data-dir", e.data],
        "(3)",
    ),
    (
        "evaluate on no test examples",
        lambda e: [
            "evaluate",
            "--model",
            e.model,
            "--task",
            "sst2",
            "--data-dir",
            e.data,
            "--max-test",
            0,
        ],
        "max_test",
    ),
    (
        "more demonstrations than the dev slice",
        lambda e: [
            "evaluate",
            "--model",
            e.model,
            "--task",
            "sst2",
            "--data-dir",
            e.data,
            "--few-shot",
            1000,
        ],
        "1000 demonstrations per class asked for",
    ),
    (
        "lm train of no steps",
        lambda e: ["lm", "train", "--out", e.tmp / "lm", "--data-dir", e.data, "--max-steps", 0],
        "max_steps",
    ),
    (
        "audit against another data folder",
        lambda e: ["audit", e.run, "--data-dir", e.tmp / "other-data", "--out", e.tmp / "a.json"],
        "is not the release's sst2/train.jsonl: pass the --data-dir",
    ),
    (
        "filter of a folder that is not a run",
        lambda e: ["filter", e.tmp / "latin1.yaml"],
        "exists and is not a folder",
    ),
    (
        "run with a shard past the count",
        lambda e: ["run", "--config", e.tmp / "grid.yaml", "--out", e.tmp / "x", "--shard", "3/2"],
        "expected I/N with 1 <= I <= N",
    ),
    (
        "run with more shards than (task, seed) pairs",
        lambda e: ["run", "--config", e.tmp / "grid.yaml", "--out", e.tmp / "x", "--shard", "1/2"],
        "this grid has 1 (task, seed) pairs",
    ),
    (
        "run --report of a folder never run",
        lambda e: ["run", "--config", e.tmp / "grid.yaml", "--out", e.tmp, "--report"],
        "is not an experiment folder",
    ),
    (
        "quality with neither release nor model",
        lambda e: ["quality", "--data", e.tmp / "latin1.yaml", "--task", "sst2"],
        "without --release, give --model and --task",
    ),
    (
        "quality of a file not UTF-8",
        lambda e: [
            "quality",
            "--data",
            e.tmp / "latin1.yaml",
            "--model",
            e.model,
            "--task",
            "sst2",
        ],
        "not a UTF-8 text file",
    ),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(args, message, env, monkeypatch):
    monkeypatch.setenv("GRADMM_CACHE_DIR", str(env.tmp / "cache"))
    before = sorted(p.name for p in env.tmp.iterdir())
    one_line_error(cli(*args(env)), message)
    after = sorted(p.name for p in env.tmp.iterdir() if p.name != "cache")
    assert after == [p for p in before if p != "cache"]  # nothing written, nothing left behind


# ------------------------------------------------------------------ edited release records


def edit_release(env, tmp_path, change, digest: bool) -> Path:
    """A copy of the env's release with ``change`` applied to its record (and its digest
    recomputed, as a careful forger would, when ``digest``)."""
    copy = tmp_path / "rel"
    copy.mkdir()
    for f in env.rel.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    record = json.loads((copy / "release.json").read_text())
    change(record)
    if digest:
        record["record_sha256"] = record_digest(record)
    (copy / "release.json").write_text(json.dumps(record))
    return copy


def swap_label_ids(record):
    ids = record["prompt_tokens"]["label_ids"]
    ids[0], ids[1] = ids[1], ids[0]


@pytest.mark.parametrize(
    "change, digest, message",
    [
        (lambda r: r.update(counts=[400, 400]), False, "does not match its record_sha256"),
        (lambda r: r.update(counts=[400, 400]), True, "counts are not the pool size"),
        (swap_label_ids, True, "prompt_tokens are not its task's template and label words"),
        (
            lambda r: r["task"].update(template="Review: {text} Verdict:"),
            True,
            "prompt_tokens are not its task's template and label words",
        ),
    ],
    ids=["counts", "counts, digest recomputed", "label ids swapped", "template edited"],
)
def test_edited_release_records_are_refused(change, digest, message, env, tmp_path):
    rel = edit_release(env, tmp_path, change, digest)
    one_line_error(cli("generate", "--release", rel, "--out", tmp_path / "g", *SMALL), message)
    if "prompt_tokens" not in message:  # the record alone shows it: privacy reads no model
        one_line_error(cli("privacy", rel), message)
    assert not (tmp_path / "g").exists()


# --------------------------------------------------- the machine: full disk, read-only, signals


def test_full_disk_is_one_line_and_leaves_nothing(env, tmp_path, monkeypatch):
    import gradmm.stages.release

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    monkeypatch.setattr(gradmm.stages.release, "save_file", full)
    r = cli(*release_args(env.model, env.data, tmp_path / "r", n=3))
    assert r.exit_code == 2 and "Traceback" not in r.output  # above it: the progress bar
    assert r.stderr.strip().splitlines()[-1].startswith("gradmm: error: cannot write")
    assert r.stderr.strip().endswith("No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system_is_named(env, tmp_path, monkeypatch):
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    one_line_error(
        cli(*release_args(env.model, env.data, tmp_path / "r", n=3)), "read-only file system"
    )


def test_truncated_checkpoint_says_overwrite(tmp_path):
    import torch

    from gradmm.core.admm import SolverState
    from gradmm.errors import UserError

    path = tmp_path / "checkpoint.pt"
    torch.save({"x": torch.zeros(3)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="not a readable checkpoint.*--overwrite"):
        SolverState.load(path, torch.device("cpu"))


def test_sigterm_says_what_was_kept(env, tmp_path, monkeypatch):
    import gradmm.stages.release

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(gradmm.stages.release, "release_targets", terminated)
    r = cli(*release_args(env.model, env.data, tmp_path / "r", n=3))
    assert r.exit_code == 143
    assert r.stderr.strip().startswith("gradmm: terminated; nothing was written")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


@pytest.mark.parametrize("checkpointed", [False, True])
def test_interrupted_generate_keeps_a_checkpoint_or_nothing(
    checkpointed, env, tmp_path, monkeypatch
):
    """Ctrl-C before the first checkpoint leaves no folder (it once left run.lock.json and
    claimed a checkpoint was kept); after one, the folder is kept to resume."""
    from gradmm.core.admm import ADMMSolver

    def interrupted(self, problems, checkpoint, *args, **kwargs):
        if checkpointed:
            checkpoint.write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(ADMMSolver, "solve", interrupted)
    out = tmp_path / "run"
    r = cli("generate", "--release", env.rel, "--out", out, *SMALL)
    assert r.exit_code == 130
    if checkpointed:
        assert "the last checkpoint in" in r.stderr and "resume" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [
            ".gradmm.json",
            "checkpoint.pt",
            "run.lock.json",
        ]
    else:
        assert "no checkpoint had been written, so nothing was kept" in r.stderr
        assert not out.exists()


# ------------------------------------------------------- every command, a folder not gradmm's


def commands_of(group, prefix=()) -> dict[tuple[str, ...], object]:
    """Every command of the CLI, by its words (``("model", "fetch")``)."""
    import typer.main

    out = {}
    for info in group.registered_commands:
        out[(*prefix, info.name or info.callback.__name__)] = info.callback
    for sub in group.registered_groups:
        out.update(commands_of(sub.typer_instance, (*prefix, sub.name)))
    assert typer.main  # imported for its side effects on registration only
    return out


# How each command that writes is pointed at the foreign folder ``D`` (a path option or the
# folder it writes into); the others write nothing a user names.
FOREIGN = {
    ("release",): lambda e, d: release_args(e.model, e.data, d, n=3),
    ("generate",): lambda e, d: ["generate", "--release", e.rel, "--out", d, *SMALL],
    ("select",): lambda e, d: [
        "select",
        "--release",
        e.rel,
        "--out",
        d,
        "--pool",
        2,
        "--per-class",
        1,
        "--min-words",
        1,
        "--quiet",
    ],
    ("filter",): lambda e, d: ["filter", d],
    ("finetune",): lambda e, d: [
        "finetune",
        "--model",
        e.model,
        "--task",
        "sst2",
        "--train",
        e.run / "synthetic.jsonl",
        "--data-dir",
        e.data,
        "--steps",
        1,
        "--out",
        d,
    ],
    ("evaluate",): lambda e, d: [
        "evaluate",
        "--model",
        e.model,
        "--task",
        "sst2",
        "--data-dir",
        e.data,
        "--out",
        d / "report.json",
    ],
    ("run",): lambda e, d: ["run", "--config", e.tmp / "exp.yaml", "--out", d],
    ("audit",): lambda e, d: ["audit", e.run, "--data-dir", e.data, "--out", d / "report.json"],
    ("canary-audit",): lambda e, d: ["canary-audit", "--config", e.tmp / "canary.yaml", "--out", d],
    ("lm", "train"): lambda e, d: [
        "lm",
        "train",
        "--out",
        d,
        "--data-dir",
        e.data,
        "--max-steps",
        1,
    ],
}
WRITE_NOTHING_NAMED = {
    ("privacy",),
    ("quality",),
    ("model", "list"),
    ("model", "fetch"),
}  # fetch: the cache


def test_every_command_is_in_the_foreign_folder_table():
    """A new command must say here how it is pointed at a folder, or that it writes none."""
    assert set(commands_of(app)) == set(FOREIGN) | WRITE_NOTHING_NAMED


@pytest.mark.parametrize("words", sorted(FOREIGN), ids=" ".join)
def test_every_command_refuses_a_folder_it_did_not_write(words, env, tmp_path):
    (env.tmp / "exp.yaml").write_text("tasks: [sst2]\nmethods: [zero_shot]\n")
    (env.tmp / "canary.yaml").write_text(
        f"release: {{task: sst2, model: {env.model}, n_per_class: 3, data_dir: {env.data}}}\n"
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {
        "report.json": '{"mine": 1}',
        "synthetic.jsonl": "",
        "notes.txt": "years of work",
        "manifest.json": "{}",
    }
    for name, text in files.items():
        (mine / name).write_text(text)
    r = cli(*FOREIGN[words](env, mine))
    if words in (("evaluate",), ("audit",)):  # one-file results, refused over a user's file
        one_line_error(r, "not written by gradmm")
    else:
        one_line_error(r, "not a gradmm")
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no work folder beside it
