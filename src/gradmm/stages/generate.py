"""Stage 2, generate: synthetic text whose gradient matches a release.

Reads a release (never private data), builds ``per_class / batch`` ADMM problems per class, solves
them all in one batched optimisation and writes ``RUN_DIR/synthetic.jsonl`` and
``RUN_DIR/manifest.json``. An interrupted run resumes from ``RUN_DIR/checkpoint.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

from gradmm import __version__
from gradmm.core.admm import (
    ADMMSolver,
    AuthorsOverhead,
    Layout,
    Problems,
    problem_seed,
)
from gradmm.core.distributed import (
    barrier,
    gather_to_zero,
    init_from_env,
    rank_and_world,
    rank_runtime,
    shard,
    spawn,
)
from gradmm.core.lm import LoadedModel, matched_parameters
from gradmm.core.matching import AutogradMatchingLoss, MatchingLoss
from gradmm.core.projection import Projector, allowed_tokens
from gradmm.core.settings import Runtime, SolverConfig
from gradmm.core.tokens import LabelTokens, encode_text
from gradmm.data import paper
from gradmm.errors import UserError, stopped_keeping
from gradmm.files import (
    STAMP,
    OutputKind,
    check_output_dir,
    make_output_dir,
    read_json,
    remove_owned,
    write_json,
    write_jsonl,
)
from gradmm.privacy.report import report as privacy_report
from gradmm.stages.configs import GenerateConfig
from gradmm.stages.record import Release, load_release, load_release_model
from gradmm.stages.sampling import class_context, text_init_sampler

# A run folder: generate's outputs, then filter's (and audit reports of older versions).
RUN_DIR = OutputKind(
    "run",
    "synthetic.jsonl",
    (
        "synthetic.jsonl",
        "manifest.json",
        "run.lock.json",
        "checkpoint*.pt",
        "checkpoint*.pt.tmp",
        "filtered.jsonl",
        "filter_report.json",
        "audit.json",
    ),
)


def generate(
    release_dir: Path,
    out: Path,
    config: GenerateConfig,
    overwrite: bool = False,
    progress: bool = True,
    nproc: int = 1,
    runtime: Runtime | None = None,
) -> Path:
    """Run stage 2; returns the path of ``synthetic.jsonl``.

    Problems are sharded over ``nproc`` local processes, or over the ranks of an existing
    process group (``torchrun``), in contiguous blocks (see :mod:`gradmm.core.distributed` for what
    that preserves).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if check_output_dir(out, RUN_DIR) and not overwrite:
        raise UserError(f"{out} already holds a finished run (pass --overwrite to replace it)")
    if nproc > 1 and config.engine == "reference":
        raise UserError("--engine reference runs in one process (it is the oracle)")
    release = load_release(release_dir)
    runtime = runtime or Runtime()
    device = runtime.torch_device()  # a missing GPU is an error before anything is written
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} needs one GPU per process ({torch.cuda.device_count()})")
    # several ranks each load their own copy on their own GPU: validate on the CPU here
    several = nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    lm = load_release_model(release, None if several else runtime)
    # validates settings against the model before any write (decoding the whole vocabulary:
    # a single process keeps what it built)
    built = build_solver(lm, release, config)
    config_digest = hashlib.sha256(
        json.dumps(
            [config.model_dump(mode="json"), release.meta.model_dump(mode="json")], sort_keys=True
        ).encode()
    ).hexdigest()
    init_from_env(device.type)
    created = not out.exists()
    if rank_and_world()[0] == 0:
        _prepare_run_dir(out, config_digest, overwrite)  # only now: bad input leaves no folder
    barrier()
    args = (release, out, config, progress, time.perf_counter() - t0, runtime)
    try:
        if nproc > 1:
            spawn(_solve_and_write, args, nproc, device.type)
        else:
            alone = rank_and_world()[1] == 1
            _solve_and_write(*args, lm=lm if alone else None, built=built if alone else None)
            barrier()  # under torchrun: keep every rank alive until rank 0 has gathered, written
    except KeyboardInterrupt as e:
        if rank_and_world()[0] == 0:
            raise stopped_keeping(e, _abandon(out, created)) from None
        raise
    return out / "synthetic.jsonl"


def _abandon(out: Path, created: bool) -> str:
    """After Ctrl-C or SIGTERM: keep a run folder that holds a checkpoint (it resumes), else
    remove what this run wrote (its lock; the folder too if this run created it). Returns what
    was kept, for the message."""
    if any(out.glob("checkpoint*.pt")):
        return f"the last checkpoint in {out} was kept: rerun the same command to resume"
    (out / "run.lock.json").unlink(missing_ok=True)
    if created and {e.name for e in out.iterdir()} <= {STAMP}:
        shutil.rmtree(out)
    return "no checkpoint had been written, so nothing was kept: rerun the command to start again"


def _solve_and_write(
    release: Release,
    out: Path,
    config: GenerateConfig,
    progress: bool,
    load_seconds: float,
    runtime: Runtime,
    lm: LoadedModel | None = None,
    built: tuple | None = None,
) -> None:
    """Solve this rank's block of problems; rank 0 gathers all blocks and writes the files.
    ``lm`` and ``built`` (:func:`build_solver`'s answer for it): the caller's, if it has them."""
    t0 = time.perf_counter()
    rank, world = rank_and_world()
    lm = lm or load_release_model(release, rank_runtime(runtime))
    solver, problems, contexts = built or build_solver(lm, release, config)
    mine = shard(len(problems), rank, world)
    block = problems[mine.start : mine.stop]
    checkpoint = out / ("checkpoint.pt" if world == 1 else f"checkpoint.rank{rank}.pt")
    solution = solver.solve(block, checkpoint, config.checkpoint_every, progress and rank == 0)
    parts = gather_to_zero(
        (solution.ids.cpu(), solution.rec.cpu(), solution.timings, solution.history)
    )
    if parts is None:
        return
    ids = torch.cat([p[0] for p in parts])
    rec = torch.cat([p[1] for p in parts])
    # seconds per stage summed over ranks (= wall time x processes when balanced)
    timings = {"load": load_seconds}
    for part in parts:
        for k, v in part[2].items():
            timings[k] = timings.get(k, 0.0) + v

    t_write = time.perf_counter()
    task, classes = release.task, problems.classes
    ppl = per_token_perplexity(lm, ids, classes, contexts, release.prompt.head).cpu()
    rows = []
    for p in range(len(problems)):
        c = int(classes[p])
        for b in range(config.batch):
            rows.append(
                {
                    "id": len(rows),
                    "text": lm.tokenizer.decode(ids[p, b].tolist()).strip(),
                    "label": c,
                    "label_name": task.label_names[c],
                    "problem": p,
                    "rec_loss": round(float(rec[p]), 6),
                    "perplexity": round(float(ppl[p, b]), 4),
                }
            )
    timings["write"] = time.perf_counter() - t_write
    timings["total"] = load_seconds + time.perf_counter() - t0
    manifest = _manifest(config, release, solver.cfg, problems, timings, rows)
    manifest["processes"] = world
    # per rank, per outer iteration: seconds since its solve started, mean best rec of its block
    manifest["history"] = [[[round(t, 3), round(r, 6)] for t, r in part[3]] for part in parts]
    write_jsonl(out / "synthetic.jsonl", rows)
    write_json(out / "manifest.json", manifest)
    for leftover in [*out.glob("checkpoint*.pt"), out / "run.lock.json"]:
        leftover.unlink(missing_ok=True)


def build_solver(
    lm: LoadedModel, release: Release, config: GenerateConfig
) -> tuple[ADMMSolver, Problems, list[list[int]]]:
    """The solver, the run's problems (``per_class / batch`` per class, class-major) and the LM
    prefix ids per class, as :func:`generate` uses them."""
    task, prompt = release.task, release.prompt
    as_paper = config.preset == "paper"
    contexts = _projection_contexts(lm, release, config)
    freeze = config.freeze_template
    if freeze is None:
        freeze = paper.freezes_template(task) if as_paper else True
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    layout = Layout(
        prompt.head, config.length, prompt.tail, [labels.feed(c) for c in range(task.num_classes)]
    )
    longest = layout.length + max(map(len, contexts))
    if lm.context_length is not None and longest > lm.context_length:
        raise UserError(f"--length {config.length} plus template exceeds the model's context")
    allowed = allowed_tokens(lm.tokenizer, lm.embeddings.shape[0], config.token_filter)
    reference = config.engine == "reference"
    projector = Projector(
        lm.model,
        lm.embeddings,
        allowed,
        config.topk,
        contexts,
        order=config.projection,
        use_cache=not reference,
    )
    no_matching = config.target == "none"  # one random draw, projected; the target is unused
    solver_cfg = SolverConfig(
        **{
            **{name: getattr(config, name) for name in SolverConfig.model_fields},
            "freeze_template": freeze,
            "steps": 0 if no_matching else config.steps,
            "init_candidates": 1 if no_matching else config.init_candidates,
        }
    )
    targets = {n: t.to(lm.device) for n, t in release.targets.items()}
    out = release.meta.output_params
    if release.meta.match_params != "last-block" and not reference:
        loss = MatchingLoss(
            targets[out.weight], targets.get(out.bias), lm.output, labels, release.space
        )
    else:  # the authors' computation, and the only one beyond the output layer: double backward
        params = matched_parameters(lm.model, release.meta.match_params)
        loss = AutogradMatchingLoss(params, targets, labels, release.space, (out.weight, out.bias))
    solver = ADMMSolver(
        lm.model,
        loss,
        projector,
        layout,
        config.batch,
        solver_cfg,
        lm.embeddings,
        hooks=AuthorsOverhead() if reference else None,
        sequential=reference,
        init_sampler=(
            text_init_sampler(lm, task, prompt, allowed, config.batch, config.length)
            if config.init == "lm"
            else None
        ),
    )
    classes = torch.arange(task.num_classes).repeat_interleave(config.per_class // config.batch)
    problems = Problems(classes, [problem_seed(config.seed, p) for p in range(len(classes))])
    return solver, problems, contexts


def _prepare_run_dir(out: Path, config_digest: str, overwrite: bool) -> None:
    """Start fresh, or resume an unfinished run of the same configuration."""
    lock = out / "run.lock.json"
    if overwrite and out.exists():
        remove_owned(out, RUN_DIR)  # only gradmm's own files (checked by check_output_dir)
    if lock.exists():
        if json.loads(lock.read_text()).get("config_sha256") != config_digest:
            raise UserError(
                f"{out} holds an unfinished run with different settings (pass --overwrite)"
            )
        return
    make_output_dir(out, RUN_DIR)
    write_json(lock, {"config_sha256": config_digest})


def _projection_contexts(lm: LoadedModel, release: Release, config: GenerateConfig) -> list:
    """Per class, the token ids the projection's LM reads before the text
    (``config.projection_context``)."""
    task, prompt = release.task, release.prompt
    if config.projection_context == "demonstrations":
        purpose = "--projection-context demonstrations"
        return [
            class_context(task, prompt, lm.tokenizer, c, purpose) for c in range(task.num_classes)
        ]
    prefix = config.lm_prefix or (paper.lm_prefix(task) if config.preset == "paper" else None)
    chat = task.chat_template or config.projection_context == "chat"
    return [
        _context_ids(lm, (prefix or task.lm_prefix).replace("{label}", w.strip()), chat)
        for w in task.label_words
    ]


def _context_ids(lm: LoadedModel, prefix: str, chat: bool = False) -> list[int]:
    """Token ids of the projection's LM context: ``prefix`` as it is, or (``chat``) as a user
    turn of the tokenizer's chat template followed by the assistant's turn, for instruct models."""
    if chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise UserError(
                "a chat template was asked for (the task's chat_template or --projection-context "
                "chat), but the tokenizer has none"
            )
        return list(
            lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prefix}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    ids = encode_text(lm.tokenizer, prefix)
    if not ids and lm.tokenizer.bos_token_id is not None:
        ids = [lm.tokenizer.bos_token_id]
    return ids


def release_entry(release: Release) -> dict:
    """Which release a run matched, for its manifest."""
    return {
        "path": str(release.path.resolve()),
        "targets_sha256": release.meta.targets_sha256,
        "task": release.task.name,
        "model": release.meta.model.model_dump(mode="json"),
        "mechanism": release.meta.mechanism.model_dump(mode="json"),
    }


def data_read_entry(release: Release) -> dict:
    """What a stage that reads ``release`` (and no real text) read, for its manifest."""
    m = release.meta.mechanism
    return {
        "data": f"release {release.path} (targets only, no text)",
        "private": release.meta.target == "real",
        "covered_by_dp": m.private or release.meta.target == "noise",
        "protection": "none: exact class means"
        if m.type == "none"
        else ("seeded simulation, no guarantee" if m.seeded else f"({m.epsilon}, {m.delta})-DP"),
    }


def load_run_release(run_dir: Path) -> Release:
    """The release a run was generated from, verified to be the very one (same sha256)."""
    manifest = read_json(Path(run_dir) / "manifest.json")
    recorded = manifest.get("release") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        raise UserError(f"{run_dir}/manifest.json does not name the run's release")
    release = load_release(Path(recorded["path"]))
    if release.meta.targets_sha256 != recorded.get("targets_sha256"):
        raise UserError(
            f"the release at {release.path} is not the one {run_dir} was generated from "
            "(its targets' sha256 differs)"
        )
    return release


@torch.no_grad()
def per_token_perplexity(
    lm: LoadedModel, ids: Tensor, classes: Tensor, contexts: list[list[int]], head: list[int]
) -> Tensor:
    """(P, B, G) free ids -> (P, B) exp(mean NLL of the free tokens | LM prefix + template head),
    on the CPU."""
    n_problems, batch, length = ids.shape
    out = torch.empty(n_problems, batch)
    for c in classes.unique().tolist():
        sel = (classes == c).nonzero(as_tuple=True)[0]
        prefix = torch.tensor(contexts[c] + head, dtype=torch.long)
        free = ids[sel].reshape(-1, length)
        seq = torch.cat([prefix.expand(free.shape[0], -1), free], 1).to(lm.device)
        logits = lm.model(input_ids=seq).logits[:, len(prefix) - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), free.to(lm.device), reduction="none"
        )
        out[sel] = nll.mean(1).exp().reshape(len(sel), batch).cpu()
    return out


def _manifest(config, release, solver_cfg, problems, timings, rows) -> dict:
    import tokenizers
    import transformers

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label_name"]] = counts.get(r["label_name"], 0) + 1
    recs = [r["rec_loss"] for r in rows[:: config.batch]]
    return {
        "stage": "generate",
        "gradmm_version": __version__,
        "config": config.model_dump(mode="json"),
        "solver": solver_cfg.__dict__,
        "release": release_entry(release),
        "privacy_report": privacy_report(release.meta),
        "data_read": [data_read_entry(release)],
        "seeds": {"seed": config.seed, "problem_seeds": problems.seeds},
        "counts": counts,
        "mean_rec_loss": sum(recs) / len(recs),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
