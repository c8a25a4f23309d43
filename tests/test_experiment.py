"""The experiment runner on a tiny model: every method runs, tables are written, finished cells
are not recomputed (nor mixed with cells of other settings), and real text never lands under
the output folder; a rerun in a fresh folder reproduces the table."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from gradmm.data.tasks import BUILTIN_TASKS, load_examples
from gradmm.errors import UserError
from gradmm.experiments import methods, report
from gradmm.experiments import runner as experiment
from gradmm.experiments.results import CellResult
from gradmm.files import read_jsonl
from gradmm.privacy.report import report as privacy_report
from gradmm.stages.record import load_release


def test_runner_all_methods_resume_and_no_real_text(model_dirs, data_dir, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0, 1]\n"
        "n_per_class: 3\nsynthetic_per_class: 4\nfew_shot_k: 1\ndp_epsilons: [2.0]\n"
        "generate: {batch: 2, length: 5, steps: 1, inner_steps: 2, init_candidates: 2, topk: 5}\n"
        "select: {pool: 6, min_words: 1}\n"
        "filter: {keep_per_class: 3, classifier: false}\n"
        "finetune: {steps: 4, batch_size: 4, eval_every: 2, lr: 0.001}\n"
    )
    out = tmp_path / "exp"
    rows = experiment.run_experiment(spec, out, progress=False)
    labels = {report.method_label(r) for r in rows}
    assert labels == {
        "zero_shot",
        "few_shot",
        "real_private",
        "real_random",
        "lm_prompted",
        "gradmm_paper",
        "gradmm",
        "dp_gradmm@eps2",
        "dp_noise@eps2",
        "dp_none",
        "lm_selected",
        "real_private_size_matched",
        "real_random_size_matched",
        "lm_prompted_size_matched",
    }
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 28
    accuracy_table = (out / "results.md").read_text().split("## ")[0]
    assert accuracy_table.count("±") == 1 + 14  # header + one per method
    # equal budgets: each baseline cut, per class, to the filtered gradmm set of its seed
    for seed in (0, 1):
        got = {r.method: r for r in rows if r.seed == seed}
        kept = got["gradmm"].train_per_class
        assert got["real_random"].train_per_class == [4, 4] and max(kept) <= 3
        assert got["lm_selected"].train_per_class == [4, 4] and got["lm_selected"].mean_rec_loss
        for base in ("real_private", "real_random", "lm_prompted"):
            sized = got[f"{base}_size_matched"]
            full = got[base].train_per_class
            assert sized.train_per_class == [min(a, b) for a, b in zip(kept, full, strict=True)]
            if full == sized.train_per_class:  # nothing cut: the same run, reused
                assert sized.same_as == base and sized.samples is None
                assert sized.test_accuracy == got[base].test_accuracy
            else:
                assert sized.same_as is None
    assert "| gradmm − real_random_size_matched |" in results_md_text(out)
    assert (out / "accuracy.png").stat().st_size > 0
    # every training set's perplexity, under the same scoring; samples of synthetic sets only
    assert "## Training texts: perplexity" in results_md_text(out)
    assert "## Training sets: matching loss · label fidelity" in results_md_text(out)
    by_method = {report.method_label(r): r for r in rows if r.seed == 0}
    assert by_method["real_private"].train_perplexity > 0
    assert by_method["real_private"].samples is None and by_method["gradmm"].samples
    # quality: the matching loss of a GRADMM set against its own release; a baseline's against
    # the default release of its task and seed (the pool itself matches it best of all)
    from gradmm.stages.quality import matching_loss
    from gradmm.stages.record import load_release_model

    default = load_release(out / "releases/sst2/seed0/default")
    lm = load_release_model(default)
    filtered = read_jsonl(out / "cells/sst2/gradmm/seed0/run/filtered.jsonl")
    assert by_method["gradmm"].quality["matching_loss"] == pytest.approx(
        matching_loss(lm, default, filtered), abs=1e-5
    )
    # the dev curve holds the step the dev slice selected, and the untrained model at step 0
    curve = by_method["gradmm"].dev_curve
    assert [point["step"] for point in curve] == [0, 2, 4]
    picked = {
        "step": by_method["gradmm"].selected_step,
        "accuracy": by_method["gradmm"].dev_accuracy,
    }
    assert picked in curve
    losses = {m: by_method[m].quality["matching_loss"] for m in ("real_private", "lm_prompted")}
    assert losses["real_private"] < losses["lm_prompted"]
    # result.json holds the measurements made, and only those: no null for a missing one
    zero_shot = json.loads((out / "cells/sst2/zero_shot/seed0/result.json").read_text())
    assert "dev_accuracy" in zero_shot and "train_loss" not in zero_shot
    assert "**sst2 / gradmm**" in results_md_text(out)
    # the DP releases are recorded simulations with independent noise, and the table says so
    results_md = (out / "results.md").read_text()
    assert "## What the DP rows are" in results_md and "not a composed guarantee" in results_md
    dp_rel = load_release(out / "releases/sst2/seed0/dp_eps2")
    noise_rel = load_release(out / "releases/sst2/seed0/noise_eps2")
    seeds = [r.meta.mechanism.noise_seed for r in (dp_rel, noise_rel)]
    assert None not in seeds and seeds[0] != seeds[1]
    assert "SIMULATION" in privacy_report(dp_rel.meta)
    pair = torch.stack([dp_rel.target_weight.flatten(), noise_rel.target_weight.flatten()])
    assert abs(float(torch.corrcoef(pair)[0, 1])) < 0.05
    assert all(r.privacy["noise_seed"] is not None for r in rows if r.epsilon is not None)

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    original = experiment.run_cell
    experiment.run_cell = boom
    try:
        assert len(experiment.run_experiment(spec, out, progress=False)) == 28
        spec.write_text(spec.read_text().replace("seeds: [0, 1]", "seeds: [1]"))
        assert len(experiment.run_experiment(spec, out, progress=False)) == 14  # a subset
    finally:
        experiment.run_cell = original

    spec.write_text(spec.read_text().replace("lr: 0.001", "lr: 0.01"))
    with pytest.raises(UserError, match="different finetune"):
        experiment.run_experiment(spec, out, progress=False)
    spec.write_text(spec.read_text().replace("lr: 0.01", "lr: 0.001"))
    recorded = json.loads((out / "experiment.json").read_text())
    del recorded["dev_slice_rule"]  # cells of a gradmm whose dev slices were other rows
    (out / "experiment.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="different dev_slice_rule"):
        experiment.run_experiment(spec, out, progress=False)

    real = load_examples(BUILTIN_TASKS["sst2"], "train", data_dir).texts
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".csv", ".md"):
            content = path.read_text()
            assert not any(f'"{t}"' in content for t in real), path


def test_committed_cell_results_load_and_dump_as_written():
    """Every committed result.json is a CellResult, and dumping it gives the file back (the same
    keys and values: a measurement a method did not make stays absent); a misspelt key fails."""
    paths = sorted((Path(__file__).parents[1] / "experiments/results").glob("**/result.json"))
    if not paths:
        pytest.skip("no committed experiment cells")
    for path in paths:
        recorded = json.loads(path.read_text())
        assert CellResult.model_validate(recorded).model_dump(mode="json") == recorded, path
    with pytest.raises(ValidationError, match="test_acuracy"):
        CellResult.model_validate({**recorded, "test_acuracy": 0.5})


def test_a_size_matched_baseline_with_nothing_to_cut_reuses_its_base_cell(
    model_dirs, data_dir, tmp_path
):
    """One private example per class, fewer than the filtered gradmm set keeps: nothing is cut,
    so real_private_size_matched is real_private's finished cell, marked ``same_as``."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0]\n"
        "methods: [real_private, gradmm, real_private_size_matched]\n"
        "n_per_class: 1\nsynthetic_per_class: 4\n"
        "generate: {batch: 2, length: 5, steps: 1, inner_steps: 2, init_candidates: 2, topk: 5}\n"
        "filter: {keep_per_class: 3, classifier: false}\n"
        "finetune: {steps: 4, batch_size: 4, eval_every: 2, lr: 0.001}\n"
    )
    out = tmp_path / "exp"
    base, gradmm, sized = experiment.run_experiment(spec, out, progress=False)
    assert min(gradmm.train_per_class) >= 1 and base.train_per_class == [1, 1]
    assert sized.same_as == "real_private" and sized.method == "real_private_size_matched"
    assert sized.measured() == base.measured().model_copy(update={"same_as": "real_private"})
    cell = out / "cells/sst2/real_private_size_matched/seed0"
    written = json.loads((cell / "result.json").read_text())
    assert written["same_as"] == "real_private" and "samples" not in written


def test_lm_seeded_gradmm_filtered_prompts_and_sizes_matched_to_each_variant(
    model_dirs, data_dir, tmp_path
):
    """The second round's methods: ``gradmm_lm`` generates from LM init with the file's
    ``generate_lm`` changes; ``lm_prompted_filtered`` is ``lm_prompted``'s own texts through the
    experiment's filter (the same function as a GRADMM run's, on rows); a baseline matched to
    ``gradmm_lm`` is cut to that cell's filtered per-class counts."""
    from gradmm.stages.configs import FilterConfig
    from gradmm.stages.filtering import filter_rows
    from gradmm.stages.record import load_release_model

    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0]\n"
        "methods: [lm_prompted, gradmm_lm, lm_prompted_filtered,\n"
        "  lm_prompted_filtered_size_matched_to_gradmm_lm, real_random_size_matched_to_gradmm_lm]\n"
        "n_per_class: 3\nsynthetic_per_class: 4\n"
        "generate: {batch: 2, length: 5, steps: 1, inner_steps: 2, init_candidates: 2, topk: 5}\n"
        "generate_lm: {steps: 0}\n"
        "filter: {keep_per_class: 3, classifier: false}\n"
        "finetune: {steps: 4, batch_size: 4, eval_every: 2, lr: 0.001}\n"
    )
    out = tmp_path / "exp"
    got = {r.method: r for r in experiment.run_experiment(spec, out, progress=False)}
    manifest = json.loads((out / "cells/sst2/gradmm_lm/seed0/run/manifest.json").read_text())
    assert manifest["config"]["init"] == "lm" and manifest["config"]["steps"] == 0
    prompted = read_jsonl(out / "cells/sst2/lm_prompted/seed0/synthetic.jsonl")
    filtered = read_jsonl(out / "cells/sst2/lm_prompted_filtered/seed0/filtered.jsonl")
    release = load_release(out / "releases/sst2/seed0/default")
    config = FilterConfig(keep_per_class=3, classifier=False)
    kept, _ = filter_rows(load_release_model(release), release, prompted, config)
    assert filtered == kept and got["lm_prompted_filtered"].train_per_class == [
        sum(r["label"] == c for r in kept) for c in (0, 1)
    ]
    counts = got["gradmm_lm"].train_per_class
    for base in ("lm_prompted_filtered", "real_random"):
        sized = got[f"{base}_size_matched_to_gradmm_lm"]
        full = got[base].train_per_class if base in got else [4, 4]
        assert sized.train_per_class == [min(a, b) for a, b in zip(counts, full, strict=True)]


def test_cut_per_class_keeps_a_seeded_subset_in_order():
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(30)]
    cut = methods.cut_per_class(rows, [4, 10, 20], seed=0)
    assert [sum(r["label"] == c for r in cut) for c in range(3)] == [4, 10, 10]
    assert cut == [r for r in rows if r in cut]  # rows' order
    assert cut == methods.cut_per_class(rows, [4, 10, 20], seed=0)
    assert cut != methods.cut_per_class(rows, [4, 10, 20], seed=1)
    assert methods.cut_per_class(rows, [10, 10, 10], seed=0) == rows  # nothing to cut


def test_size_matched_methods_must_follow_gradmm(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("tasks: [sst2]\nmethods: [real_random_size_matched, gradmm]\n")
    with pytest.raises(UserError, match="list gradmm before it"):
        experiment.load_experiment(spec)


def _row(task, method, seed, acc, eps=None, n=20, step=5, pool=None, match=None) -> CellResult:
    return CellResult(
        task=task,
        method=method,
        seed=seed,
        epsilon=eps,
        n_per_class=pool,
        match_params=match,
        test_accuracy=acc,
        test_per_class_accuracy={},
        dev_accuracy=None,
        train_examples=n,
        selected_step=step,
        seconds=1.0,
    )


def test_comparison_table_pairs_by_task_and_seed():
    rows = [
        _row("sst2", "zero_shot", 0, 0.50),
        _row("sst2", "zero_shot", 1, 0.60),
        _row("sst2", "gradmm", 0, 0.70),
        _row("sst2", "gradmm", 1, 0.60),
        _row("sst2", "dp_gradmm", 0, 0.55, eps=8.0),
        _row("sst2", "dp_gradmm", 1, 0.65, eps=8.0),
        _row("sst2", "dp_noise", 0, 0.50, eps=1.0),
        _row("sst2", "dp_noise", 1, 0.50, eps=1.0),
        _row("sst2", "dp_noise", 0, 0.60, eps=8.0),
        _row("sst2", "dp_noise", 1, 0.70, eps=8.0),
    ]
    lines = report.comparison_table(rows).splitlines()
    # paired: (70-50, 60-60) = +10 ± 14.1, one seed won, the tie counts for neither
    assert "| gradmm − zero_shot | +10.0 ± 14.1 (1/2) |" in lines
    # a DP method meets the noise control of its own epsilon only
    assert "| dp_gradmm@eps8 − dp_noise@eps8 | -5.0 ± 0.0 (0/2) |" in lines
    assert not any("eps1" in line for line in lines)
    assert not any("lm_prompted" in line for line in lines)  # absent baselines are skipped
    sizes = report.markdown_table(rows[:4], report._size_cell)
    assert "| gradmm | 20.0 · 0/2 |" in sizes


def test_cells_expand_epsilons():
    cfg = experiment.ExperimentConfig(
        tasks=["sst2"], seeds=[0], dp_epsilons=[1, 4], methods=["gradmm", "dp_gradmm", "dp_none"]
    )
    assert experiment.cells(cfg) == [
        ("sst2", "gradmm", 0, None, None, None),
        ("sst2", "dp_gradmm", 0, 1, None, None),
        ("sst2", "dp_gradmm", 0, 4, None, None),
        ("sst2", "dp_none", 0, None, None, None),
    ]


def test_exclude_leaves_out_the_matching_cells_and_refuses_a_typo(tmp_path):
    cfg = experiment.ExperimentConfig(
        tasks=["sst2"],
        seeds=[0, 1],
        dp_epsilons=[1, 4],
        methods=["zero_shot", "dp_gradmm"],
        dp_pool_sizes=[25, 250],
        dp_match_params=["output", "label-rows"],
        exclude=[
            {"method": "dp_gradmm", "match_params": "output", "n_per_class": 25},
            {"seed": 1, "epsilon": 4},
        ],
    )
    kept = experiment.cells(cfg)
    full = experiment._grid(cfg)
    assert len(full) == 2 * (1 + 2 * 2 * 2)
    dropped = [k for k in full if k not in kept]
    # 4 output cells at n=25 (2 seeds x 2 ε), 4 at seed 1 and ε 4 (2 n x 2 targets), one shared
    assert len(dropped) == 4 + 4 - 1
    assert ("sst2", "dp_gradmm", 0, 1, 25, None) in dropped  # None: the output layer
    assert ("sst2", "dp_gradmm", 0, 1, 25, "label-rows") in kept
    assert ("sst2", "zero_shot", 1, None, None, None) in kept  # no ε: not matched by ε 4
    spec = tmp_path / "exp.yaml"
    spec.write_text("tasks: [sst2]\nmethods: [dp_gradmm]\nexclude: [{n_per_class: 25}]\n")
    with pytest.raises(UserError, match="exclude: {'n_per_class': 25} matches no cell"):
        experiment.load_experiment(spec)
    spec.write_text(
        "tasks: [sst2]\nmethods: [gradmm, real_private_size_matched]\n"
        "exclude: [{method: gradmm, seed: 2}]\n"
    )
    with pytest.raises(
        UserError,
        match="real_private_size_matched of sst2 seed 2 reads the gradmm cell, which is excluded",
    ):
        experiment.load_experiment(spec)


def test_one_noise_release_per_target_is_the_control_of_every_epsilon_and_n():
    def dp(method, seed, acc, eps, n, match):
        return _row("sst2", method, seed, acc, eps=eps, pool=n, match=match)

    rows = [
        dp("dp_gradmm", s, 0.6 + 0.1 * s, eps, n, "sketch")
        for s in (0, 1)
        for eps in (1.0, 4.0)
        for n in (25, 250)
    ]
    rows += [dp("dp_gradmm", s, 0.6, 1.0, 2500, None) for s in (0, 1)]
    rows += [dp("dp_noise", s, 0.5, 1.0, 25, "sketch") for s in (0, 1)]
    lines = report.comparison_table(rows).splitlines()
    assert "| dp_gradmm@eps4/n250/sketch − dp_noise@eps1/n25/sketch | +15.0 ± 7.1 (2/2) |" in lines
    # the output-layer cells have no noise control of their own target: none is borrowed
    assert not any(line.startswith("| dp_gradmm@eps1/n2500 −") for line in lines)
    # with a second sketch control, every cell needs its exact one
    rows += [dp("dp_noise", s, 0.7, 4.0, 250, "sketch") for s in (0, 1)]
    lines = report.comparison_table(rows).splitlines()
    assert "| dp_gradmm@eps4/n250/sketch − dp_noise@eps4/n250/sketch | -5.0 ± 7.1 (0/2) |" in lines
    assert not any(line.startswith("| dp_gradmm@eps1/n250/sketch −") for line in lines)


def test_dp_study_plot_legend_names_every_series_of_every_panel(monkeypatch, tmp_path):
    """The legend lists each series once even when no single panel has them all (dp-utility's
    output-layer panels have no n = 25 line, its small targets no n = 2500 one)."""

    def dp(method, seed, eps, n, match):
        return _row("sst2", method, seed, 0.6, eps=eps, pool=n, match=match)

    rows = [
        dp("dp_gradmm", s, eps, n, m)
        for s in (0, 1)
        for eps in (1.0, 4.0)
        for n, m in ((25, "sketch"), (2500, None))
    ]
    rows += [dp("dp_noise", s, 1.0, 25, m) for s in (0, 1) for m in ("sketch", None)]
    rows += [_row("sst2", "zero_shot", s, 0.5) for s in (0, 1)]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.plot_dp_study(rows, tmp_path / "dp.png")
    labels = [
        t.get_text()
        for ax in figures[0].axes
        if ax.get_legend()
        for t in ax.get_legend().get_texts()
    ]
    assert sorted(labels) == sorted(
        ["dp_gradmm n=25", "dp_gradmm n=2500", "dp_noise (any ε, n)", "zero_shot"]
    )


def test_dp_study_axes_pair_each_release_with_its_own_control(model_dirs, data_dir, tmp_path):
    """Pool sizes x released gradients x ε for the DP methods, Poisson-sampled pools: every cell
    has its own release and noise stream, its control is the noise-only release of the same
    settings, and results.csv has the study's columns."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['phi']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0]\n"
        "methods: [dp_gradmm, dp_noise]\nsynthetic_per_class: 2\ndp_epsilons: [2.0]\n"
        "dp_pool_sizes: [10, 20]\ndp_match_params: [label-rows, sketch]\ndp_sketch_dim: 4\n"
        "dp_sampling: poisson\n"
        "generate: {batch: 2, length: 4, steps: 1, inner_steps: 1, init_candidates: 2, topk: 5}\n"
        "filter: {keep_per_class: 2, classifier: false}\n"
        "finetune: {steps: 2, batch_size: 2, eval_every: 2}\n"
    )
    out = tmp_path / "exp"
    rows = experiment.run_experiment(spec, out, progress=False)
    assert len(rows) == 8
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    for column in (
        "task",
        "method",
        "seed",
        "epsilon",
        "n_per_class",
        "match_params",
        "test_accuracy",
        "dev_accuracy",
        "mean_matching_loss",
    ):
        assert all(row[column] != "" for row in table), column
    seeds = set()
    for n in (10, 20):  # rates 0.5 and 1 of the 40 rows outside the dev slice
        for match, shape in (("label-rows", (2, 2, 32)), ("sketch", (2, 4, 4))):
            rel = load_release(out / f"releases/sst2/seed0/dp_eps2_n{n}_{match}")
            m = rel.meta.mechanism
            assert rel.meta.match_params == match and tuple(rel.target_weight.shape) == shape
            assert m.sampling_rate == pytest.approx(2 * n / 40) and m.normaliser == n
            seeds.add(m.noise_seed)
    assert len(seeds) == 4  # every release its own noise
    comparisons = report.comparison_table(rows)
    assert "| dp_gradmm@eps2/n10/sketch − dp_noise@eps2/n10/sketch |" in comparisons
    assert (out / "dp_accuracy_vs_epsilon.png").stat().st_size > 0


def test_rerun_in_a_fresh_folder_reproduces_the_table(model_dirs, data_dir, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0]\n"
        "methods: [dp_gradmm, real_random]\nn_per_class: 3\nsynthetic_per_class: 4\n"
        "dp_epsilons: [2.0]\n"
        "generate: {batch: 2, length: 5, steps: 1, inner_steps: 2, init_candidates: 2, topk: 5}\n"
        "filter: {keep_per_class: 3, classifier: false}\n"
        "finetune: {steps: 4, batch_size: 4, eval_every: 2, lr: 0.001}\n"
    )
    first = experiment.run_experiment(spec, tmp_path / "a", progress=False)
    second = experiment.run_experiment(spec, tmp_path / "b", progress=False)
    for a, b in zip(first, second, strict=True):
        assert a.model_dump(exclude={"seconds"}) == b.model_dump(exclude={"seconds"})
    targets = [
        (tmp_path / d / "releases/sst2/seed0/dp_eps2/targets.safetensors").read_bytes()
        for d in "ab"
    ]
    assert targets[0] == targets[1]  # the same noise draw, not just the same accuracy


def test_two_shards_one_after_the_other_give_the_cells_of_one_run(model_dirs, data_dir, tmp_path):
    """``--shard 1/2`` then ``2/2`` in one folder: the same cells (every number, the releases
    byte for byte) as one unsharded run; only the second, which finishes the grid, writes the
    tables, and ``report_experiment`` writes them for a partial grid."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"model: {model_dirs['llama']}\ndata_dir: {data_dir}\ntasks: [sst2]\nseeds: [0, 1]\n"
        "methods: [real_random, gradmm, real_random_size_matched]\n"
        "n_per_class: 3\nsynthetic_per_class: 4\n"
        "generate: {batch: 2, length: 5, steps: 1, inner_steps: 2, init_candidates: 2, topk: 5}\n"
        "filter: {keep_per_class: 3, classifier: false}\n"
        "finetune: {steps: 4, batch_size: 4, eval_every: 2, lr: 0.001}\n"
    )
    whole = experiment.run_experiment(spec, tmp_path / "one", progress=False)
    sharded = tmp_path / "sharded"
    first = experiment.run_experiment(
        spec, sharded, progress=False, shard=experiment.Shard.parse("1/2")
    )
    assert {r.seed for r in first} == {0} and len(first) == 3  # seed 1 is the other shard's
    assert not (sharded / "results.md").exists()
    partial = experiment.report_experiment(spec, sharded)
    assert len(partial) == 3 and (sharded / "results.md").exists()
    (sharded / "results.md").unlink()
    rows = experiment.run_experiment(
        spec, sharded, progress=False, shard=experiment.Shard.parse("2/2")
    )
    assert len(rows) == len(whole) == 6
    for a, b in zip(whole, rows, strict=True):
        assert a.model_dump(exclude={"seconds"}) == b.model_dump(exclude={"seconds"})
    assert (sharded / "results.md").read_text() == (tmp_path / "one/results.md").read_text()
    for seed in (0, 1):
        release = f"releases/sst2/seed{seed}/default/targets.safetensors"
        assert (sharded / release).read_bytes() == (tmp_path / "one" / release).read_bytes()


def test_docs_quote_the_committed_results():
    """Every block ``<!-- from FILE -->`` ... ``<!-- end -->`` of README.md and docs/results.md
    holds verbatim tables of that committed, generated file (paths relative to the repository)."""
    root = Path(__file__).parents[1]
    blocks = {
        doc: re.findall(
            r"<!-- from (\S+) -->(.*?)<!-- end -->", (root / doc).read_text(), re.DOTALL
        )
        for doc in ("README.md", "docs/results.md")
    }
    assert blocks["README.md"], "the README quotes a headline table"
    assert {
        "experiments/results/cpu-small/results.md",
        "experiments/results/cpu-smollm2/results.md",
        "experiments/results/dp-utility/results.md",
    } <= {source for source, _ in blocks["docs/results.md"]}
    for source, quoted in blocks["README.md"] + blocks["docs/results.md"]:
        committed = (root / source).read_text()
        tables = [t for t in quoted.split("\n\n") if t.lstrip().startswith("|")]
        assert tables, source
        for table in tables:
            assert table.strip() in committed, source


def results_md_text(out: Path) -> str:
    return (out / "results.md").read_text()


def test_text_perplexity_batched_equals_one_at_a_time_and_by_hand(model_dirs):
    from gradmm.models.loading import load_model
    from gradmm.stages.evaluate import text_perplexities

    lm = load_model(str(model_dirs["llama"]))
    texts = ["the film was great", "a dull plot", "the cast was lovely and the music moving"]
    batched = text_perplexities(lm, texts, batch_size=3)
    alone = [text_perplexities(lm, [t])[0] for t in texts]
    assert batched == pytest.approx(alone, rel=1e-5)
    ids = torch.tensor([[lm.tokenizer.bos_token_id] + lm.tokenizer(texts[1])["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1], -1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
    assert alone[1] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_text_perplexity_of_a_text_longer_than_the_context(model_dirs):
    """GPT-2 has 128 learned positions here: a longer text is scored on its first tokens."""
    import math

    from gradmm.models.loading import load_model
    from gradmm.stages.evaluate import text_perplexities

    lm = load_model(str(model_dirs["gpt2"]))
    long_text = " ".join(["the film was great and the music moving"] * 40)
    (ppl,) = text_perplexities(lm, [long_text])
    assert math.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ("dp_match_params: [last-block]", "no closed-form clipping"),
        ("dp_match_params: [sketch]", "dp_sketch_dim goes with a sketch"),
        ("dp_sketch_dim: 8", "dp_sketch_dim goes with a sketch"),
        ("synthetic_per_class: 25\ngenerate: {batch: 10}", "must be a multiple of --batch"),
    ],
)
def test_settings_are_checked_before_any_cell(extra, message, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"tasks: [sst2]\nmethods: [dp_gradmm]\n{extra}\n")
    with pytest.raises(UserError, match=message):
        experiment.load_experiment(spec)


def test_plots_of_a_grid_without_fine_tuning_warn_nothing(tmp_path):
    """A zero-shot-only grid has no loss curve: matplotlib warned "No artists with labels found
    to put in legend" into `gradmm run`'s output."""
    import warnings

    rows = [_row("sst2", "zero_shot", s, 0.5) for s in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot(rows, tmp_path)
    assert (tmp_path / "loss_curves.png").is_file()
