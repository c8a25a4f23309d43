"""Outputs never destroy a user's files, and bad input never gets a traceback: tampered, swapped
or malformed releases, unwritable destinations, Ctrl-C, and names that shadow the shipped LM."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, one_line_error, release_args, tiny_run
from safetensors.torch import load_file, save_file

from gradmm.errors import UserError
from gradmm.files import OutputKind, check_output_dir, staged_dir

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
KIND = OutputKind("thing", "done.json", ("done.json", "data.bin", "sub"))


def release(model, data_dir, out, *extra):
    return cli(*release_args(model, data_dir, out, n=3), *extra)


# ------------------------------------------------------------------------ output folders


def test_protected_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (Path("."), Path("/"), Path.home(), tmp_path.parent):
        with pytest.raises(UserError, match="refusing to write outputs"):
            check_output_dir(path, KIND)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(tmp_path / "file" / "out", KIND)
    with pytest.raises(UserError, match="not a folder"):
        check_output_dir(tmp_path / "file", KIND)
    assert check_output_dir(tmp_path / "new", KIND) is False


def test_staged_dir_replaces_only_its_own_entries(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, KIND) as tmp:
        (tmp / "done.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("old")
    assert check_output_dir(out, KIND) is True
    with staged_dir(out, KIND) as tmp:  # the second output has no `sub`: the old one goes
        (tmp / "done.json").write_text("2")
        (tmp / "data.bin").write_text("new")
    assert sorted(os.listdir(out)) == [".gradmm.json", "data.bin", "done.json"]
    assert (out / "done.json").read_text() == "2"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a gradmm thing folder"):
        check_output_dir(out, KIND)
    with pytest.raises(UserError, match="never writes into"), staged_dir(out, KIND) as tmp:
        (tmp / "done.json").write_text("3")
    assert (out / "notes.txt").read_text() == "mine" and (out / "done.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_release_and_finetune_never_delete_a_folder_they_did_not_write(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    model = model_dirs["llama"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        one_line_error(release(model, data_dir, mine, *extra), "not a gradmm release folder")
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "the film was great", "label": 1}\n')
    ft = [
        "finetune",
        "--model",
        model,
        "--task",
        "sst2",
        "--train",
        train,
        "--data-dir",
        data_dir,
        "--steps",
        1,
        "--quiet",
    ]
    one_line_error(cli(*ft, "--out", mine), "not a gradmm finetune folder")
    assert sorted(os.listdir(mine)) == ["thesis.tex"]
    monkeypatch.chdir(mine)
    one_line_error(release(model, data_dir, "."), "refusing to write outputs")
    one_line_error(cli(*ft, "--out", "."), "refusing to write outputs")
    assert sorted(os.listdir(mine)) == ["thesis.tex"]

    # their own outputs: refused without --overwrite, replaced with it
    assert cli(*ft, "--out", tmp_path / "ft").exit_code == 0
    one_line_error(cli(*ft, "--out", tmp_path / "ft"), "--overwrite")
    assert cli(*ft, "--out", tmp_path / "ft", "--overwrite").exit_code == 0
    assert release(model, data_dir, tmp_path / "rel").exit_code == 0
    assert release(model, data_dir, tmp_path / "rel", "--overwrite").exit_code == 0
    assert sorted(os.listdir(tmp_path / "rel")) == [
        ".gradmm.json",
        "release.json",
        "targets.safetensors",
    ]


def test_generate_and_run_refuse_foreign_folders(model_dirs, data_dir, tmp_path):
    rel, _ = tiny_run(tmp_path, model_dirs["llama"], data_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("a,b")
    one_line_error(
        cli("generate", "--release", rel, "--out", mine, *SMALL, "--overwrite"),
        "not a gradmm run folder",
    )
    config = tmp_path / "exp.yaml"
    config.write_text("tasks: [sst2]\nmethods: [zero_shot]\n")
    one_line_error(cli("run", "--config", config, "--out", mine), "not a gradmm experiment")
    assert sorted(os.listdir(mine)) == ["data.csv"]


def test_release_destination_is_checked_before_private_data_is_read(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    import gradmm.data.pools

    def no_reading(*args, **kwargs):
        raise AssertionError("the private data was read")

    monkeypatch.setattr(gradmm.data.pools, "private_pool", no_reading)
    (tmp_path / "file").write_text("x")
    one_line_error(release(model_dirs["llama"], data_dir, tmp_path / "file" / "rel"), "is a file")
    one_line_error(
        release(
            model_dirs["llama"],
            data_dir,
            tmp_path / "r",
            "--epsilon",
            1,
            "--delta",
            1e-5,
            "--clip",
            "inf",
        ),
        "clip",
    )
    assert not (tmp_path / "r").exists()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        one_line_error(release(model_dirs["llama"], data_dir, locked / "rel"), "cannot write")


# ------------------------------------------------------------------- releases as inputs


def rewrite_record(rel: Path, change) -> None:
    """Change ``release.json`` and record its new digest, as a careless tool would."""
    from gradmm.stages.record import record_digest

    meta = json.loads((rel / "release.json").read_text())
    change(meta)
    meta["record_sha256"] = record_digest(meta)
    (rel / "release.json").write_text(json.dumps(meta))


def rewrite_targets(rel: Path, change) -> None:
    """Change ``targets.safetensors`` and record its new sha256, as a careless tool would."""
    tensors = change(load_file(rel / "targets.safetensors"))
    save_file(tensors, rel / "targets.safetensors")
    digest = hashlib.sha256((rel / "targets.safetensors").read_bytes()).hexdigest()
    rewrite_record(rel, lambda meta: meta.update(targets_sha256=digest))


def test_tampered_or_swapped_releases_are_refused_by_every_reader(model_dirs, data_dir, tmp_path):
    rel, run = tiny_run(tmp_path, model_dirs["llama"], data_dir)
    other = tmp_path / "other"
    assert (
        cli(
            "release",
            "--task",
            "sst2",
            "--model",
            model_dirs["llama"],
            "--data-dir",
            data_dir,
            "--out",
            other,
            "--n-per-class",
            2,
        ).exit_code
        == 0
    )
    pristine = (rel / "targets.safetensors").read_bytes()
    tensors = load_file(rel / "targets.safetensors")
    tensors = {k: v + 1e-3 for k, v in tensors.items()}
    save_file(tensors, rel / "targets.safetensors")  # tampered, sha256 not updated
    readers = [
        ("generate", "--release", rel, "--out", tmp_path / "g", *SMALL),
        ("filter", run),
        ("audit", run, "--out", tmp_path / "a.json"),
        ("privacy", rel),
    ]
    for args in readers:
        one_line_error(cli(*args), "does not match the sha256")
    shutil.copy(other / "targets.safetensors", rel / "targets.safetensors")  # swapped
    for args in readers:
        one_line_error(cli(*args), "sha256")
    # a whole valid release swapped in under the run's release path
    shutil.copy(other / "release.json", rel / "release.json")
    one_line_error(cli("filter", run), "not the one", "generated from")
    one_line_error(cli("audit", run, "--out", tmp_path / "a.json"), "not the one")
    assert not (tmp_path / "g").exists() and not (tmp_path / "a.json").exists()
    assert pristine != (rel / "targets.safetensors").read_bytes()


@pytest.mark.parametrize(
    "defect, message",
    [
        ("nan", "NaN or infinite"),
        ("shape", "has shape"),
        ("classes", "one row per class"),
        ("missing", "targets.safetensors is missing"),
        ("prompt_tokens", "prompt_tokens"),
    ],
)
def test_generate_refuses_malformed_releases(defect, message, model_dirs, data_dir, tmp_path):
    rel = tmp_path / "rel"
    assert release(model_dirs["llama"], data_dir, rel).exit_code == 0
    if defect == "nan":
        rewrite_targets(
            rel,
            lambda t: {k: v.index_fill(1, torch.tensor([0]), float("nan")) for k, v in t.items()},
        )
    elif defect == "shape":
        rewrite_targets(rel, lambda t: {k: v[:, :-1].contiguous() for k, v in t.items()})
    elif defect == "classes":  # 3 classes for the 2-class sst2
        rewrite_targets(rel, lambda t: {k: torch.cat([v, v[:1]]) for k, v in t.items()})
    elif defect == "missing":
        (rel / "targets.safetensors").unlink()
    else:
        rewrite_record(rel, lambda meta: meta.pop("prompt_tokens"))
    run = tmp_path / "run"
    one_line_error(cli("generate", "--release", rel, "--out", run, *SMALL), message)
    assert not run.exists()  # no stale run.lock.json


def test_release_over_a_non_dp_release_says_what_is_there(model_dirs, data_dir, tmp_path):
    rel = tmp_path / "rel"
    assert release(model_dirs["llama"], data_dir, rel).exit_code == 0
    r = release(model_dirs["llama"], data_dir, rel, "--epsilon", 1, "--delta", 1e-5)
    one_line_error(r, "already holds a release", "--overwrite")
    assert "DP" not in r.stderr


def test_release_json_holds_nothing_derived_from_the_private_data(model_dirs, data_dir, tmp_path):
    rel = tmp_path / "rel"
    assert release(model_dirs["llama"], data_dir, rel).exit_code == 0
    meta = json.loads((rel / "release.json").read_text())
    assert "seconds" not in json.dumps(meta)  # timing depends on the private texts' lengths
    assert meta["data_source"] == "sst2/train.jsonl"
    assert str(data_dir) not in json.dumps(meta)  # no local path of the private data anywhere


# ------------------------------------------------------------------------ the CLI itself


def test_ctrl_c_prints_what_was_kept(model_dirs, data_dir, tmp_path, monkeypatch):
    import gradmm.stages.generate
    import gradmm.stages.release

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradmm.stages.release, "release_targets", interrupt)
    r = release(model_dirs["llama"], data_dir, tmp_path / "rel")
    assert r.exit_code == 130
    assert r.stderr.strip() == (
        "gradmm: interrupted; nothing was written (outputs are written only when finished); "
        "rerun the command to start again"
    )
    monkeypatch.setattr(gradmm.stages.generate, "generate", interrupt)
    r = cli("generate", "--release", tmp_path / "rel", "--out", tmp_path / "run")
    assert r.exit_code == 130 and "rerun the same command" in r.stderr


def test_a_local_folder_named_reference_does_not_shadow_the_shipped_lm(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    from gradmm.models.checkpoints import REFERENCE_LM_DIR

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dirs["llama"], tmp_path / "reference")
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    task = tmp_path / "task.yaml"  # the shipped LM's tokenizer has these label words
    task.write_text(
        f"label_names: [neg, pos]\nlabel_words: [' bad', ' great']\nlocal_dir: {data / 'sst2'}\n"
    )
    r = cli(
        "release",
        "--task",
        task,
        "--model",
        "reference",
        "--out",
        tmp_path / "rel",
        "--n-per-class",
        2,
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert meta["model"]["path"] == str(REFERENCE_LM_DIR.resolve())


def test_file_names_alone_never_make_a_folder_gradmms(model_dirs, data_dir, tmp_path, monkeypatch):
    """A Hugging Face model folder has the file names `lm train` writes, and a folder of someone
    else's checkpoints those of a run: without gradmm's stamp both are refused, untouched."""
    hf = tmp_path / "some-llama"
    shutil.copytree(model_dirs["llama"], hf)
    before = sorted(os.listdir(hf))
    one_line_error(
        cli("lm", "train", "--out", hf, "--data-dir", data_dir, "--max-steps", 1),
        "not a gradmm model folder",
    )
    one_line_error(
        cli("lm", "train", "--out", tmp_path / "new", "--work", hf, "--data-dir", data_dir),
        "not a gradmm training work folder",
    )
    monkeypatch.chdir(tmp_path)
    one_line_error(
        cli("lm", "train", "--out", tmp_path / "new", "--work", ".", "--data-dir", data_dir),
        "refusing to write outputs",
    )
    assert sorted(os.listdir(hf)) == before and not (tmp_path / "new").exists()

    rel = tmp_path / "rel"
    assert release(model_dirs["llama"], data_dir, rel).exit_code == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text("{}")
    (theirs / "checkpoint_best.pt").write_bytes(b"weights")
    one_line_error(
        cli("generate", "--release", rel, "--out", theirs, *SMALL, "--overwrite"),
        "not a gradmm run folder",
    )
    assert (theirs / "checkpoint_best.pt").read_bytes() == b"weights"


def test_unreadable_inputs_are_one_line(model_dirs, data_dir, tmp_path):
    binary = tmp_path / "train.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(
        cli(
            "finetune",
            "--model",
            model_dirs["llama"],
            "--task",
            "sst2",
            "--train",
            binary,
            "--data-dir",
            data_dir,
            "--out",
            tmp_path / "ft",
        ),
        "not a UTF-8 text file",
    )
    r = cli(
        "evaluate",
        "--model",
        model_dirs["llama"],
        "--task",
        "sst2",
        "--data-dir",
        data_dir,
        "--out",
        binary,
    )
    one_line_error(r, "not written by gradmm evaluate")
    assert binary.read_bytes() == b"\xff\xfe\x00garbage"


def test_audit_of_the_working_directory_writes_beside_it(
    model_dirs, data_dir, tmp_path, monkeypatch
):
    _, run = tiny_run(tmp_path, model_dirs["llama"], data_dir)
    monkeypatch.chdir(run)
    r = cli("audit", ".", "--data-dir", data_dir)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run.audit.json").is_file() and not (run / ".audit.json").exists()
