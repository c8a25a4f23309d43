"""Stage 1, release: the only stage that reads private (real) examples.

It samples ``n_per_class`` examples per class from the task's private split (stratified,
seeded; :mod:`gradmm.data.pools`), computes each class's mean output-layer gradient at the
model's weights and writes

* ``targets.safetensors``: one tensor per matched parameter, class dimension first;
* ``release.json`` (:class:`gradmm.stages.record.ReleaseMeta`): task (with its template and
  verbalizer), model name and fingerprint, the tokenised prompt, counts, seed, how the targets
  were computed and the sha256 of ``targets.safetensors``. No text, no statistic of the private
  examples other than the targets and counts, nothing that depends on them (no timings, no path
  of the private file).

Later stages read a release and public data only. The ``mechanism`` entry of ``release.json``
says what protects the targets: ``none``, or the Gaussian mechanism of
:mod:`gradmm.privacy.accounting` when ``epsilon``/``delta`` are given. ``target="noise"`` is the
pure-noise control: the same noise, no signal, and no data read at all.

Audits and experiments that must see the pool a release read (``gradmm audit``, canary audits,
the ``real_private`` baseline) get it through the functions at the end of this module, never
from :mod:`gradmm.data.pools` directly (``pyproject.toml``, ``[tool.importlinter]``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from gradmm import __version__
from gradmm.core.gradients import (
    GradientSpace,
    example_gradients,
    per_example_grad_norms,
    summed_autograd_grads,
    summed_grads,
    zero_gradients,
)
from gradmm.core.lm import LoadedModel, fingerprint, matched_parameters, place
from gradmm.core.settings import Runtime
from gradmm.core.tokens import LabelTokens, PromptTokens, tokenize_prompt
from gradmm.data import paper, pools
from gradmm.data.tasks import Examples, Task, load_examples, load_task
from gradmm.errors import UserError, warn
from gradmm.files import check_output_dir, staged_dir, write_json
from gradmm.models.checkpoints import resolve_model_name
from gradmm.models.loading import load_model
from gradmm.privacy.accounting import (
    DPSettings,
    Mechanism,
    check_settings,
    delta_warning,
    mechanism,
)
from gradmm.privacy.noise import noisy_means, seeded_stream
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.record import (
    RELEASE_DIR,
    RELEASE_FORMAT,
    ModelInfo,
    OutputParams,
    Release,
    ReleaseMeta,
    load_release,
    record_digest,
)

SPACE_DESCRIPTIONS = {
    "output": "",
    "last-block": "",
    "label-rows": ", the output layer's rows of the label words' tokens only",
    "sketch": ", sketched as A G Bᵀ (A: R x V, B: R x d, N(0, 1/R) entries from sketch_seed)",
}


def release_targets(
    config: ReleaseConfig, out: Path, overwrite: bool = False, runtime: Runtime | None = None
) -> Release:
    """Run the release stage and write ``out``; see the module docstring.

    A DP release is never redrawn: if ``out`` already holds a release with the same settings it is
    returned as it is; different settings, or ``overwrite``, are refused (a second noisy release
    of the same examples spends more privacy: write it elsewhere and compose the two with
    ``gradmm privacy``). Every check on the settings and on ``out`` runs before the private data
    is read.
    """
    out = Path(out)
    dp = check_release_settings(config)
    existing = _existing_release(out, config, overwrite)
    if existing is not None:
        return existing
    task = release_task(config)
    if dp is not None:
        _warn_on_delta(dp, config, task)
    # targets are computed in fp32 (on the runtime's device)
    lm = place(load_model(config.model), Runtime(device=(runtime or Runtime()).device))
    if dp is not None:
        task = _fit_context(task, lm)
    prompt = tokenize_prompt(task, lm.tokenizer)
    params = matched_parameters(lm.model, config.match_params)
    head = list(params)[:2] if lm.output.bias is not None else list(params)[:1]
    space = _checked_space(config, lm, prompt)
    # data-independent, and may refuse the settings: decided before any private data is read
    protection = _protection(config, dp, task.num_classes, space, lm, len(head) > 1)

    pool, sums = _class_sums_of_pool(config, task, lm, prompt, params, head, space, dp)
    if dp is None:
        counts = pool.counts
        per_class = [{n: g / k for n, g in s.items()} for s, k in zip(sums, counts, strict=True)]
    else:
        per_class = noisy_means(sums, protection, _random_bytes(config, "noise"))
    tensors = {name: torch.stack([t[name] for t in per_class]).contiguous() for name in params}
    meta = ReleaseMeta(
        format=RELEASE_FORMAT,
        gradmm_version=__version__,
        task=task,
        target=config.target,
        split=pool.split,
        data_source=pool.source,
        model=_model_info(config.model, lm),
        prompt_tokens=prompt,
        counts=pool.counts,
        seed=config.seed,
        config=config,
        description=_description(config),
        match_params=config.match_params,
        parameters=list(params),
        output_params=OutputParams(weight=head[0], bias=head[1] if len(head) > 1 else None),
        mechanism=protection,
        planted=pool.planted,
        targets_sha256="",
    )
    _write(out, meta, tensors)
    return Release(out, meta, tensors)


class PoolRead(NamedTuple):
    """What the release records of the pool it read: split and file (None for the ``noise``
    control, which reads nothing), examples per class, canary rows planted per class."""

    split: str | None
    source: str | None
    counts: list[int]
    planted: list[int] | None


def _class_sums_of_pool(config, task, lm, prompt, params, head, space, dp):
    """(:class:`PoolRead`, per-class summed (clipped) gradients): the only read of private data."""
    if config.target == "noise":  # the control reads no data at all
        counts = [config.n_per_class] * task.num_classes
        return PoolRead(None, None, counts, None), [
            zero_gradients(params, head, space) for _ in counts
        ]
    split = config.split or task.private_split
    examples, picked, counts, planted = read_pool(config, task, split)
    source = f"{task.name}/{Path(examples.source).name}"
    sums = _class_sums(lm, prompt, params, head, space, examples, picked, config, dp)
    return PoolRead(split, source, counts, planted), sums


def check_release_settings(config: ReleaseConfig) -> DPSettings | None:
    """The checks of a release's settings that need neither the model nor data (run first by
    every command that releases); the DP settings, or None for a non-DP release."""
    if not config.private:
        return None
    if config.match_params == "last-block":
        raise UserError(
            "DP releases need closed-form clipping: --match-params output, label-rows or sketch"
        )
    check_settings(config.epsilon, config.delta)
    return DPSettings(
        epsilon=config.epsilon,
        delta=config.delta,
        clip=config.clip,
        neighbouring=config.neighbouring,
    )


def release_task(config: ReleaseConfig) -> Task:
    """The task as the release records it: the preset's tokenisation and any text cut applied
    (generate and filter then cut alike; finetune and evaluate load the task by name: a task
    file's max_text_tokens reaches them, this option does not)."""
    task = load_task(config.task)
    if config.preset == "paper":
        task = paper.paper_task(task)
    if config.max_text_tokens is not None:
        task = task.model_copy(update={"max_text_tokens": config.max_text_tokens})
    return task


def _existing_release(out: Path, config: ReleaseConfig, overwrite: bool) -> Release | None:
    """The DP release ``out`` already holds with these very settings (reused, never redrawn), or
    None when ``out`` is free (or is a non-DP release and ``overwrite`` is given)."""
    if not check_output_dir(out, RELEASE_DIR):
        return None
    existing = load_release(out)
    noisy = existing.meta.mechanism.type == "gaussian"
    same = existing.meta.config.public_fields() == config.public_fields()
    # a seeded simulation is never handed out for a release asked to be private (or v.v.)
    same = same and existing.meta.mechanism.noise_seed == config.noise_seed
    same = same and config.canary_file is None  # planted rows are not in the public fields
    if noisy and same and not overwrite:
        existing.reused = True
        return existing
    if noisy and existing.meta.target == "real":
        raise UserError(
            f"{out} already holds a DP release; it is never redrawn (use a new --out "
            "and compose the two with `gradmm privacy`)"
        )
    if not overwrite:
        raise UserError(f"{out} already holds a release (pass --overwrite to replace it)")
    return None


def _warn_on_delta(dp: DPSettings, config: ReleaseConfig, task: Task) -> None:
    protected = config.n_per_class * task.num_classes  # the pool, or the split it samples
    if config.sampling_rate is not None:
        protected = round(protected / config.sampling_rate)
    note = delta_warning(dp.delta, protected)
    if note:
        warn(note)


def _fit_context(task: Task, lm: LoadedModel) -> Task:
    """A text too long for the context would stop a release only if it were sampled, and the
    stop would say so: a DP release cuts every text to fit instead (public inputs only)."""
    if lm.context_length is None:
        return task
    prompt = tokenize_prompt(task, lm.tokenizer)
    fitting = lm.context_length - (
        len(prompt.head) + len(prompt.tail) + max(map(len, prompt.label_ids)) - 1
    )
    if fitting < 1:
        raise UserError(
            f"the template and label words fill the model's context "
            f"({lm.context_length} tokens): no room for a text"
        )
    if task.max_text_tokens is None or task.max_text_tokens > fitting:
        return task.model_copy(update={"max_text_tokens": fitting})
    return task


def _checked_space(config: ReleaseConfig, lm: LoadedModel, prompt: PromptTokens) -> GradientSpace:
    vocab_rows, hidden = lm.output.weight.shape
    if config.sketch_dim is not None and config.sketch_dim > min(vocab_rows, hidden):
        raise UserError(
            f"--sketch-dim {config.sketch_dim} is larger than the model's hidden size "
            f"({hidden}) or vocabulary ({vocab_rows}): a sketch compresses, choose at "
            f"most {min(vocab_rows, hidden)}"
        )
    return GradientSpace.of(
        config.match_params,
        prompt.label_ids,
        vocab_rows,
        hidden,
        config.sketch_dim,
        config.sketch_seed,
    )


def _protection(
    config: ReleaseConfig,
    dp: DPSettings | None,
    classes: int,
    space: GradientSpace,
    lm: LoadedModel,
    has_bias: bool,
) -> Mechanism:
    """The mechanism of the release: calibrated to the numbers it holds (which picks the
    sampler), from public inputs only."""
    if dp is None:
        return Mechanism(type="none")
    r1, r2 = space.shape(*lm.output.weight.shape)
    coordinates = classes * (r1 * r2 + (r1 if has_bias else 0))
    return mechanism(dp, config.n_per_class, coordinates, config.noise_seed, config.sampling_rate)


def _class_sums(lm, prompt, params, head, space, examples, picked, config, dp) -> list[dict]:
    """Per class, the sum over its sampled examples of the (clipped, if DP) gradients, in
    ``space`` (clipped there too: the sensitivity is that of what is released)."""
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    sums = []
    for c, indices in enumerate(tqdm(picked, desc="release: class targets", unit="class")):
        seqs = [_encoded(lm, prompt, labels, examples, i) for i in indices]
        classes = [c] * len(seqs)
        if not seqs:  # a Poisson sample may miss a class: its sum is zero (then noise)
            sums.append(zero_gradients(params, head, space))
        elif config.match_params != "last-block":
            r, h, weights = example_gradients(lm, seqs, classes, labels, config.batch_size)
            r, h = space.to(r.device).map_r(r), space.to(h.device).map_h(h)
            if dp is not None:  # joint clipping of (weight, bias) from closed-form norms
                norms = per_example_grad_norms(r, h, weights, has_bias=len(head) > 1)
                weights = weights * torch.clamp(dp.clip / norms, max=1.0)[:, None]
            sums.append(dict(zip(head, summed_grads(r, h, weights), strict=False)))
        else:
            sums.append(summed_autograd_grads(lm, params, seqs, classes, labels, config.batch_size))
    return [{name: g.float().cpu() for name, g in s.items()} for s in sums]


def _encoded(
    lm: LoadedModel, prompt: PromptTokens, labels: LabelTokens, examples: Examples, i: int
) -> list[int]:
    """Example ``i`` as the model reads it; one longer than the context is refused (non-DP only:
    a DP release cuts every text to fit)."""
    seq = prompt.encode(lm.tokenizer, examples.texts[i])
    ctx, feed = lm.context_length, labels.length - 1
    if ctx is not None and len(seq) + feed > ctx:
        fixed = len(prompt.head) + len(prompt.tail) + feed  # template and label feed
        raise UserError(
            f"example {i} of {examples.source} is {len(seq) + feed} tokens with the template "
            f"and label word, longer than the model's context ({ctx}): pass --max-text-tokens "
            f"{max(1, ctx - fixed)} to cut texts"
        )
    return seq


def _model_info(name: str, lm: LoadedModel) -> ModelInfo:
    resolved = Path(resolve_model_name(name)).expanduser()
    return ModelInfo(
        name=name,
        # the folder the name resolved to (`reference` is the shipped LM, never ./reference)
        path=str(resolved.resolve()) if resolved.exists() else None,
        fingerprint=fingerprint(lm.model),
        vocab_rows=int(lm.output.weight.shape[0]),
        hidden_size=int(lm.output.weight.shape[1]),
        has_bias=lm.output.bias is not None,
        tied=lm.output.tied,
    )


def _description(config: ReleaseConfig) -> str:
    audit = config.canary_file is not None
    return (
        "per-class mean over the sampled examples of the gradient of the mean CE of the label "
        "word's tokens after the template (teacher-forced) w.r.t. the matched parameters, at the "
        "model's weights, fp32"
        + SPACE_DESCRIPTIONS[config.match_params]
        + ("" if not config.private else ", each example clipped to norm C there, Gaussian noise")
        + (
            "; AUDIT RELEASE: canary rows were planted in the pool (see the counts)"
            if audit
            else ""
        )
    )


def _write(out: Path, meta: ReleaseMeta, tensors: dict[str, Tensor]) -> None:
    """Write the folder at once (staged, then renamed), the targets' and record's digests in it."""
    with staged_dir(out, RELEASE_DIR) as tmp:
        save_file(tensors, str(tmp / "targets.safetensors"))
        meta.targets_sha256 = hashlib.sha256((tmp / "targets.safetensors").read_bytes()).hexdigest()
        record = meta.model_dump(mode="json")
        meta.record_sha256 = record["record_sha256"] = record_digest(record)
        write_json(tmp / "release.json", record)


def _random_bytes(config: ReleaseConfig, purpose: str) -> Callable[[int], bytes]:
    """Random bytes for ``purpose`` (noise, sampling): the OS CSPRNG, or a simulation's seeded
    stream, keyed by the purpose too (the sample and the noise never share draws)."""
    if config.noise_seed is None:
        return secrets.token_bytes
    public = config.public_fields()
    return seeded_stream(config.noise_seed, public if purpose == "noise" else [public, purpose])


# ------------------------------------------------------------ the pool, for release and audits


def read_pool(
    config: ReleaseConfig, task: Task, split: str
) -> tuple[Examples, list[list[int]], list[int], list[int] | None]:
    """The private examples a release with ``config`` reads: the split, per class the indices of
    the pool, the public counts (normalisers) and the planted rows per class (canary audits)."""
    if config.sampling == "poisson":
        examples, picked = pools.poisson_pool(
            task, split, config.sampling_rate, config.data_dir, _random_bytes(config, "sampling")
        )
        counts = [config.n_per_class] * task.num_classes  # the sample's sizes stay private
    else:
        examples, picked = pools.private_pool(
            task, split, config.n_per_class, config.seed, config.data_dir
        )
        counts = [len(ix) for ix in picked]
    planted = None
    if config.canary_file is not None:  # an audit: planted rows always join the pool
        before = [len(ix) for ix in picked]
        examples, picked = pools.planted_pool(task, examples, picked, config.canary_file)
        planted = [len(ix) - n for ix, n in zip(picked, before, strict=True)]
        counts = [n + k for n, k in zip(counts, planted, strict=True)]
    return examples, picked, counts, planted


def rows_outside_pool(config: ReleaseConfig, task: Task, split: str) -> tuple[Examples, list[int]]:
    """The split and the rows a release with ``config`` never reads: outside the dev slice and,
    for a fixed pool, outside the pool (a Poisson sample may take any other row)."""
    examples = load_examples(task, split, config.data_dir)
    taken = set(pools.private_pool_exclusions(task, split, examples))
    if config.sampling == "fixed":
        _, picked = pools.private_pool(
            task, split, config.n_per_class, config.seed, config.data_dir
        )
        taken |= {i for ix in picked for i in ix}
    return examples, [i for i in range(len(examples.labels)) if i not in taken]


def pool_rows(task: Task, n_per_class: int, seed: int, data_dir: str | None) -> list[dict]:
    """``{"text", "label"}`` rows of the pool a fixed release of these settings reads from the
    private split (the experiments' ``real_private`` baseline trains on them)."""
    examples, picked = pools.private_pool(task, task.private_split, n_per_class, seed, data_dir)
    return [{"text": examples.texts[i], "label": c} for c, ix in enumerate(picked) for i in ix]


def audited_pool(
    meta: ReleaseMeta, data_dir: str | None, canary_file: Path | None
) -> tuple[Examples, list[list[int]], list[int]]:
    """The pool a fixed-sampling release read, re-derived from its record for an audit (private,
    like the pool): the split with any planted rows (``canary_file``), per class the pool's
    indices, and the rows it never read (outside the dev slice and the pool)."""
    if meta.config.sampling == "poisson":
        raise UserError(
            "the release drew a Poisson sample that nobody recorded (that is its privacy): "
            "there is no pool to audit against; see gradmm canary-audit"
        )
    task, split = meta.task, meta.split
    examples, picked = pools.private_pool(task, split, meta.config.n_per_class, meta.seed, data_dir)
    found = f"{task.name}/{Path(examples.source).name}"
    if meta.data_source is not None and meta.data_source != found:
        raise UserError(
            f"the data found ({examples.source}) is not the release's "
            f"{meta.data_source}: pass the --data-dir the release read"
        )
    excluded = set(pools.private_pool_exclusions(task, split, examples))
    if canary_file is not None:  # a canary audit's release: its planted rows were pooled too
        examples, picked = pools.planted_pool(task, examples, picked, canary_file)
    if [len(ix) for ix in picked] != meta.counts:
        raise UserError("the private pool cannot be re-derived from the release's settings")
    taken = excluded | {i for ix in picked for i in ix}
    return examples, picked, [i for i in range(len(examples.labels)) if i not in taken]


def eligible_rows(task: Task, data_dir: str | None) -> int:
    """Rows of the private split a pool may take (outside the dev slice)."""
    examples = load_examples(task, task.private_split, data_dir)
    return len(examples.labels) - len(
        pools.private_pool_exclusions(task, task.private_split, examples)
    )
