"""Experiment runner: tasks x methods x seeds through the same stages as the command line.

Every cell writes ``OUT/cells/<task>/<method>/seed<k>/result.json`` (a
:class:`gradmm.experiments.results.CellResult`) and is skipped when that file exists, so an
interrupted run resumes; releases are shared by the cells of one (task, seed). A grid larger than
one machine runs as shards (:class:`Shard`, ``gradmm run --shard I/N``): processes or machines
sharing OUT, each running the cells of its (task, seed) pairs; the last to finish writes the
tables. The methods are
the registry of :mod:`gradmm.experiments.methods`, the tables and plots
:mod:`gradmm.experiments.report`. The experiment file is validated whole (stage sections, the
demonstrations methods need) before any cell runs. One private pool is released under each ε,
without DP and as ``real_private`` training data: each ε row is a separate simulation, not a
composed guarantee. The protocol is in ``docs/evaluation.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from gradmm.core.lm import fingerprint
from gradmm.core.settings import MatchParams, Runtime
from gradmm.data.tasks import DEV_SLICE_RULE, load_task
from gradmm.errors import UserError
from gradmm.experiments.methods import DEFAULT_METHODS, METHODS, Cell, cell_folder, cell_name
from gradmm.experiments.report import plot, write_tables
from gradmm.experiments.results import CellResult, MethodResult, read_result
from gradmm.files import OutputKind, check_output_dir, make_output_dir, read_json, write_json
from gradmm.models.loading import load_model
from gradmm.options import build_config
from gradmm.stages.configs import FilterConfig, FinetuneConfig, GenerateConfig, SelectConfig

EXPERIMENT_DIR = OutputKind(
    "experiment",
    "experiment.json",
    ("experiment.json", "cells", "releases", "results.csv", "results.md", "*.png"),
)


CellKey = tuple[str, str, int, float | None, int | None, str | None]


class CellFilter(BaseModel):
    """Cells to leave out of a grid: those whose every given field equals its value (like a CI
    matrix's ``exclude``), e.g. ``{method: dp_gradmm, match_params: output, n_per_class: 25}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    task: str | None = None
    method: str | None = None
    seed: int | None = None
    epsilon: float | None = None
    n_per_class: int | None = None
    match_params: MatchParams | None = None

    def matches(self, key: CellKey) -> bool:
        task, method, seed, eps, n, match = key
        if match is None and eps is not None:  # a per-ε cell's plain release: the output layer
            match = "output"
        fields = {
            "task": task,
            "method": method,
            "seed": seed,
            "epsilon": eps,
            "n_per_class": n,
            "match_params": match,
        }
        return all(fields[f] == v for f, v in self.model_dump(exclude_none=True).items())


class ExperimentConfig(BaseModel):
    """An experiment file (YAML). ``generate``/``filter``/``finetune`` hold stage options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = "reference"
    data_dir: str | None = None
    tasks: list[str] = Field(min_length=1)
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = [0, 1, 2]
    n_per_class: int = Field(25, ge=1, description="private pool per class")
    synthetic_per_class: int = Field(50, ge=1)
    few_shot_k: int = Field(2, ge=1)
    dp_epsilons: list[float] = [1.0, 8.0]
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    # Axes of a DP study: the per-ε methods (dp_gradmm, dp_noise) also run once per pool size and
    # per released gradient. None / ["output"]: n_per_class and the output layer only.
    dp_pool_sizes: list[int] | None = Field(None, description="pool sizes n per class")
    dp_match_params: list[MatchParams] = ["output"]
    dp_sketch_dim: int | None = Field(None, ge=1, description="R of the sketch target")
    # 'poisson': a DP pool of size n is a Poisson sample of the split at rate n·C / (split size
    # outside the dev slice), its guarantee stated for the split (add-or-remove-one)
    dp_sampling: Literal["fixed", "poisson"] = "fixed"
    # cells of the grid not run (say why in the file); each entry must match some cell
    exclude: list[CellFilter] = []
    generate: dict[str, Any] = {}
    select: dict[str, Any] = {}  # gradmm select's options (lm_selected)
    generate_lm: dict[str, Any] = {}  # gradmm_lm's changes to generate (it sets init: lm)
    filter: dict[str, Any] = {}
    finetune: dict[str, Any] = {}
    # device and dtype of every stage (release and fine-tuning always compute in fp32)
    runtime: Runtime = Field(default_factory=Runtime)


def load_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment file, every stage section included."""
    cfg = build_config(ExperimentConfig, {}, path)
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    # every stage section is validated now: a typo is one line before any cell runs
    classifier = build_config(FilterConfig, cfg.filter).classifier
    for changes in ({}, {"init": "lm", **cfg.generate_lm}):
        options = {**cfg.generate, **changes, "per_class": cfg.synthetic_per_class}
        build_config(GenerateConfig, options)
    for section in ("per_class", "seed"):
        if section in cfg.select:
            raise UserError(f"select: {section!r} is set by the runner, not the experiment file")
    if "lm_selected" in cfg.methods:
        build_config(SelectConfig, {**cfg.select, "per_class": cfg.synthetic_per_class})
    for section in ("model", "task", "train", "data_dir", "seed"):
        if section in cfg.finetune:
            raise UserError(f"finetune: {section!r} is set by the runner, not the experiment file")
    build_config(
        FinetuneConfig, {**cfg.finetune, "model": cfg.model, "task": cfg.tasks[0], "train": "-"}
    )
    if "last-block" in cfg.dp_match_params:
        raise UserError("dp_match_params: last-block has no closed-form clipping for DP")
    if ("sketch" in cfg.dp_match_params) != (cfg.dp_sketch_dim is not None):
        raise UserError("dp_sketch_dim goes with a sketch in dp_match_params, and only with it")
    grid = _grid(cfg)
    for entry in cfg.exclude:
        if not any(entry.matches(key) for key in grid):
            raise UserError(f"exclude: {entry.model_dump(exclude_none=True)} matches no cell")
    kept = cells(cfg)
    for task, method, seed, *_ in kept:
        after = METHODS[method].after
        if after is not None and (task, after, seed, None, None, None) not in kept:
            raise UserError(
                f"exclude: {method} of {task} seed {seed} reads the {after} cell, which is excluded"
            )
    # methods that need a task's public demonstrations: refused now, not an hour into the run
    chosen = [METHODS[m] for m in cfg.methods]
    for i, m in enumerate(chosen):
        if m.after is not None and m.after not in cfg.methods[:i]:
            raise UserError(f"method {m.name} reads the {m.after} cells: list {m.after} before it")
    for name in cfg.tasks:
        task = load_task(name)
        for m in chosen:
            if m.demonstrations:
                task.require_demonstrations(f"the {m.name} method")
        if classifier and any(m.synthetic for m in chosen):
            task.require_demonstrations(
                "the filter's few-shot classifier (filter: {classifier: false} turns it off)"
            )
    return cfg


def cells(cfg: ExperimentConfig) -> list[CellKey]:
    """(task, method, seed, epsilon, pool size, released gradient) of every cell, in run order;
    the last two are None outside a DP study's axes (the released gradient also for the output
    layer). The cells ``exclude`` matches are left out."""
    return [key for key in _grid(cfg) if not any(e.matches(key) for e in cfg.exclude)]


def _grid(cfg: ExperimentConfig) -> list[CellKey]:
    sizes = cfg.dp_pool_sizes or [None]
    # the output layer is the default release: its cells keep the plain name
    matches = [None if m == "output" else m for m in cfg.dp_match_params]
    out = []
    for task in cfg.tasks:
        for seed in cfg.seeds:
            for method in cfg.methods:
                if METHODS[method].per_epsilon:
                    out += [
                        (task, method, seed, eps, n, match)
                        for eps in cfg.dp_epsilons
                        for n in sizes
                        for match in matches
                    ]
                else:
                    out.append((task, method, seed, None, None, None))
    return out


def cell_dir(out: Path, task, method, seed, eps, n, match) -> Path:
    """The folder of the cell of key ``(task, method, seed, eps, n, match)`` (:func:`cells`)."""
    return cell_folder(out, task, cell_name(method, eps, n, match), seed)


class Shard(BaseModel):
    """Shard ``index`` of ``count`` (1-based, as ``--shard I/N``): the cells of every
    ``count``-th (task, seed) of the grid, starting at the ``index``-th. A (task, seed) is never
    split, so the releases its cells share and the cells one reads from another (the size-matched
    baselines) stay in one process; shards share nothing else and may run at the same time."""

    model_config = ConfigDict(frozen=True)
    index: int = Field(ge=1)
    count: int = Field(ge=1)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 1 ≤ I ≤ N, or a :class:`UserError`."""
        index, _, count = text.partition("/")
        if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
            raise UserError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
        return cls(index=int(index), count=int(count))

    def select(self, keys: list[CellKey]) -> list[CellKey]:
        """The cells of ``keys`` (a grid's :func:`cells`, in run order) this shard runs."""
        groups = list(dict.fromkeys((task, seed) for task, _, seed, *_ in keys))
        if self.count > len(groups):
            raise UserError(
                f"--shard {self.index}/{self.count}: this grid has {len(groups)} (task, seed) "
                f"pairs, the unit a shard runs; use at most {len(groups)} shards"
            )
        mine = set(groups[self.index - 1 :: self.count])
        return [k for k in keys if (k[0], k[2]) in mine]


def run_experiment(
    config_path: Path, out: Path, progress: bool = True, shard: Shard | None = None
) -> list[CellResult]:
    """Run (or resume) every cell, or a shard's, then :func:`write_report` once the whole grid
    is finished (by whichever shard finishes last). Returns the finished cells of the grid."""
    out = Path(out)
    cfg = load_experiment(config_path)
    todo = cells(cfg)
    mine = todo if shard is None else shard.select(todo)
    _open_experiment(cfg, out)
    # Finished cells are left out of the bar so its rate and time left count only real work.
    pending = [c for c in mine if not (cell_dir(out, *c) / "result.json").exists()]
    which = "" if shard is None else f"shard {shard.index}/{shard.count}: "
    desc = f"{which}experiment ({len(mine) - len(pending)} of {len(mine)} cells already done)"
    bar = tqdm(pending, desc=desc, unit="cell", disable=not progress)
    for key in bar:
        task, method, seed, eps, n, match = key
        path = cell_dir(out, *key) / "result.json"
        bar.set_postfix_str(f"{task}/{cell_name(method, eps, n, match)}/seed{seed}")
        started = time.time()
        measured = run_cell(cfg, out, *key)
        if match is None and eps is not None and cfg.dp_match_params != ["output"]:
            match = "output"  # named in the table when the study varies the released gradient
        result = CellResult(
            **measured.model_dump(),
            task=task,
            method=method,
            seed=seed,
            epsilon=eps,
            n_per_class=n,
            match_params=match,
            seconds=round(time.time() - started, 1),
        )
        write_json(path, result.model_dump(mode="json"))
    rows = finished_cells(cfg, out)
    if len(rows) == len(todo):
        write_report(rows, out)
    return rows


def report_experiment(config_path: Path, out: Path) -> list[CellResult]:
    """Write results.csv, results.md and the plots of the grid's finished cells (all of them or
    not) without running any; returns those cells."""
    out = Path(out)
    if not (out / "experiment.json").is_file():
        raise UserError(f"{out} is not an experiment folder of `gradmm run` (no experiment.json)")
    cfg = load_experiment(config_path)
    _open_experiment(cfg, out)
    rows = finished_cells(cfg, out)
    if not rows:
        raise UserError(f"{out} holds no finished cell of this experiment yet")
    write_report(rows, out)
    return rows


def finished_cells(cfg: ExperimentConfig, out: Path) -> list[CellResult]:
    """The results of the grid's cells that have one, in run order."""
    paths = [cell_dir(out, *c) / "result.json" for c in cells(cfg)]
    return [read_result(p) for p in paths if p.exists()]


def write_report(rows: list[CellResult], out: Path) -> None:
    """results.csv, results.md and the plots of ``rows``."""
    write_tables(rows, out)
    plot(rows, out)


def _open_experiment(cfg: ExperimentConfig, out: Path) -> None:
    """Create the experiment folder ``out`` (or check that it holds cells of the same settings,
    model weights and dev-slice rule) and record ``cfg``'s settings there."""
    check_output_dir(out, EXPERIMENT_DIR)
    make_output_dir(out, EXPERIMENT_DIR)
    weights = fingerprint(load_model(cfg.model).model)
    settings = {
        **cfg.model_dump(mode="json"),
        "model_fingerprint": weights,
        "dev_slice_rule": DEV_SLICE_RULE,
    }
    _check_same_settings(settings, out / "experiment.json")
    write_json(out / "experiment.json", settings)


# Fields that only select cells: a resumed run may change them (e.g. add a seed).
CELL_SELECTION = (
    "tasks",
    "methods",
    "seeds",
    "dp_epsilons",
    "dp_pool_sizes",
    "dp_match_params",
    "exclude",
)


def _check_same_settings(settings: dict, recorded: Path) -> None:
    """Refuse to resume ``recorded``'s cells under other settings, model weights or dev-slice
    rule."""
    if not recorded.exists():
        return
    before = read_json(recorded)
    # a setting added to gradmm since, at its default, changes nothing
    defaults = ExperimentConfig(tasks=["-"]).model_dump(mode="json")
    changed = sorted(
        k
        for k, v in settings.items()
        if k not in CELL_SELECTION and before.get(k, defaults.get(k)) != v
    )
    if changed:
        raise UserError(
            f"{recorded.parent} holds cells run with different {', '.join(changed)}; "
            "use a new --out folder"
        )


# ------------------------------------------------------------------------------------ cells


def run_cell(cfg: ExperimentConfig, out: Path, *key) -> MethodResult:
    """The result of the cell of ``key`` (:func:`cells`, :mod:`gradmm.experiments.methods`)."""
    return METHODS[key[1]].run(Cell(cfg, out, *key))
