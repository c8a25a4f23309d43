"""Devices and dtypes: clear errors for a GPU that is not there, CPU runs unchanged, and (only
where a GPU exists) the CUDA run against the CPU run."""

import json

import pytest
import torch
from conftest import cli, one_line_error, release_args

from gradmm.core.settings import Runtime
from gradmm.errors import UserError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_runtime_resolves_and_refuses_devices():
    assert Runtime(device="cpu").torch_device() == torch.device("cpu")
    auto = Runtime().torch_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        Runtime(device="gpu0").torch_device()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            Runtime(device="cuda:1").torch_device()
    with pytest.raises(ValueError):
        Runtime(dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without")
def test_missing_gpu_is_one_line_and_writes_nothing(model_dirs, data_dir, tmp_path):
    rel, run = tmp_path / "rel", tmp_path / "run"
    one_line_error(
        cli(*release_args(model_dirs["llama"], data_dir, rel), "--device", "cuda"), "no CUDA GPU"
    )
    assert not rel.exists()
    assert cli(*release_args(model_dirs["llama"], data_dir, rel), "--device", "cpu").exit_code == 0
    one_line_error(
        cli("generate", "--release", rel, "--out", run, "--device", "cuda"), "no CUDA GPU"
    )
    assert not run.exists()
    one_line_error(cli("generate", "--release", rel, "--out", run, "--dtype", "float8"), "dtype")


def test_generate_in_bfloat16_on_the_cpu(model_dirs, data_dir, tmp_path):
    rel, run = tmp_path / "rel", tmp_path / "run"
    assert cli(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    r = cli(
        "generate",
        "--release",
        rel,
        "--out",
        run,
        "--per-class",
        2,
        "--batch",
        2,
        "--length",
        4,
        "--steps",
        2,
        "--inner-steps",
        2,
        "--init-candidates",
        2,
        "--topk",
        5,
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["text"] and r["rec_loss"] < 2 for r in rows)
    r = cli("filter", run, "--dtype", "bfloat16", "--keep-per-class", 1)
    assert r.exit_code == 0, r.output


@cuda
def test_cuda_generate_matches_the_cpu_run(model_dirs, data_dir, tmp_path):
    rel = tmp_path / "rel"
    assert cli(*release_args(model_dirs["llama"], data_dir, rel)).exit_code == 0
    losses = {}
    for device in ("cpu", "cuda"):
        run = tmp_path / device
        r = cli(
            "generate",
            "--release",
            rel,
            "--out",
            run,
            "--per-class",
            4,
            "--batch",
            2,
            "--length",
            4,
            "--steps",
            3,
            "--inner-steps",
            3,
            "--init-candidates",
            4,
            "--topk",
            5,
            "--device",
            device,
            "--quiet",
        )
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
        losses[device] = [r["rec_loss"] for r in rows]
    # same draws (CPU generators), different kernels: losses agree to rounding
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3, abs=1e-4)
