"""Stage 1, release: the only code in gradmm that reads private (real) examples.

It samples ``n_per_class`` examples per class from the task's private split (stratified,
seeded), computes each class's mean output-layer gradient at the model's weights and writes

* ``targets.safetensors``: one tensor per matched parameter, class dimension first;
* ``release.json`` (:class:`ReleaseMeta`): task (with its template and verbalizer), model name
  and fingerprint, the tokenised prompt, counts, seed, how the targets were computed and the
  sha256 of ``targets.safetensors``. No text, no statistic of the private examples other than the
  targets and counts, nothing that depends on them (no timings, no path of the private file).

Later stages read a release and public data only. The ``mechanism`` entry of ``release.json`` says
what protects the targets: ``none``, or the Gaussian mechanism of
:mod:`gradmm.privacy.accounting` when
``epsilon``/``delta`` are given. ``target="noise"`` is the pure-noise control: the same noise,
no signal, and no data read at all. :func:`load_release` verifies the file against its sha256,
its shapes against the task and refuses non-finite targets, so every reader sees what was released.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from gradmm import __version__
from gradmm.core.lm import (
    LoadedModel,
    Runtime,
    final_hidden,
    fingerprint,
    load_model,
    matched_parameters,
    place,
)
from gradmm.core.matching import (
    GradientSpace,
    LabelTokens,
    per_example_grad_norms,
    residuals,
    summed_grads,
)
from gradmm.data import paper
from gradmm.data.tasks import (
    Examples,
    PromptTokens,
    Task,
    dev_indices,
    examples_from_rows,
    load_examples,
    load_task,
    tokenize_prompt,
)
from gradmm.errors import UserError, warn
from gradmm.files import (
    OutputKind,
    check_output_dir,
    read_json,
    read_jsonl_numbered,
    staged_dir,
    write_json,
)
from gradmm.models.checkpoints import resolve_model_name
from gradmm.options import one_line
from gradmm.privacy.accounting import (
    EXACT_SAMPLER,
    DPSettings,
    Mechanism,
    check_settings,
    delta_warning,
    exact_gaussian,
    gaussian_noise,
    mechanism,
    poisson_epsilon,
    seeded_stream,
    uniforms,
)
from gradmm.stages.configs import MatchParams, ReleaseConfig

RELEASE_FORMAT = 5  # 5: the record's own sha256, planted counts (4: label word sequences)
RELEASE_DIR = OutputKind("release", "release.json", ("release.json", "targets.safetensors"))


class ModelInfo(BaseModel):
    """The model a release was computed with."""

    model_config = ConfigDict(extra="forbid")
    name: str  # what the user asked for
    path: str | None  # the local folder it resolved to (None: a hub id)
    fingerprint: str
    vocab_rows: int
    hidden_size: int
    has_bias: bool
    tied: bool


class OutputParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: str
    bias: str | None


class ReleaseMeta(BaseModel):
    """``release.json``: everything later stages may know about a release."""

    model_config = ConfigDict(extra="forbid")
    format: int
    gradmm_version: str
    task: Task
    target: Literal["real", "noise"]
    split: str | None  # None: the noise-only control read no data
    data_source: str | None  # data set and split file name (never a local path)
    model: ModelInfo
    prompt_tokens: PromptTokens
    counts: list[int]
    seed: int
    config: ReleaseConfig
    description: str
    match_params: MatchParams
    parameters: list[str]
    output_params: OutputParams
    mechanism: Mechanism
    # canary audits only: rows planted per class (in ``counts`` too), None for any other release
    planted: list[int] | None = None
    targets_sha256: str
    record_sha256: str = ""  # of this record without this field (:func:`record_digest`)

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseMeta:
        """Catch edited records. ``release.json`` is not signed: with :func:`record_digest`
        these checks stop accidents and careless edits (a seeded release passed off as private,
        a real one as a control, counts that were not read), not a forger who rewrites every
        field consistently and recomputes the digests."""
        m, cfg = self.mechanism, self.config
        if self.target != cfg.target or (self.target == "noise") != (self.split is None):
            raise ValueError("target, config.target and split disagree")
        classes = self.task.num_classes
        planted = self.planted or [0] * classes
        # a Poisson sample's sizes stay private: its counts are the public normaliser
        pool = [cfg.n_per_class] * classes
        if len(planted) != classes or self.counts != [
            n + k for n, k in zip(pool, planted, strict=True)
        ]:
            raise ValueError("counts are not the pool size the settings give (n_per_class per "
                             "class, plus any planted canaries)")  # fmt: skip
        if (m.type == "gaussian") != cfg.private:
            raise ValueError("the mechanism disagrees with config.epsilon/delta")
        if m.type == "gaussian":
            if (m.epsilon, m.delta, m.clip, m.neighbouring, m.normaliser, m.sampling_rate) != (
                cfg.epsilon, cfg.delta, cfg.clip, cfg.neighbouring, cfg.n_per_class,
                cfg.sampling_rate,
            ):  # fmt: skip
                raise ValueError("the mechanism disagrees with the recorded settings")
            dp = DPSettings(epsilon=cfg.epsilon, delta=cfg.delta, clip=cfg.clip,
                            neighbouring=cfg.neighbouring)  # fmt: skip
            recorded = None
            if cfg.sampling_rate is not None:  # calibration takes a minute: check its ε instead
                recorded = m.noise_multiplier
                if poisson_epsilon(recorded, cfg.sampling_rate, cfg.delta) > cfg.epsilon * 1.001:
                    raise ValueError("mechanism.noise_multiplier does not give the recorded ε")
            expected = mechanism(dp, cfg.n_per_class, released_coordinates(self),
                                 m.noise_seed, cfg.sampling_rate, recorded)  # fmt: skip
            for field in ("sensitivity", "noise_multiplier", "sigma_sum", "sampler", "accountant"):
                a, b = getattr(m, field), getattr(expected, field)
                if a != b and not (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)):
                    raise ValueError(f"mechanism.{field} is not what the settings give")
        return self


@dataclass
class Release:
    """A loaded, verified release: what generation may use."""

    path: Path
    meta: ReleaseMeta
    targets: dict[str, Tensor]  # parameter name -> (C, *parameter shape)
    reused: bool = False  # an existing DP release returned as it was (no new noise)

    @property
    def target_weight(self) -> Tensor:
        """(C, V, d) target of the output layer's weight."""
        return self.targets[self.meta.output_params.weight]

    @property
    def target_bias(self) -> Tensor | None:
        """(C, V) target of the output layer's bias, or None."""
        name = self.meta.output_params.bias
        return None if name is None else self.targets[name]

    @property
    def space(self) -> GradientSpace:
        """Where the output layer's targets live (the full layer unless label-rows or sketch)."""
        return release_space(self.meta)

    @property
    def task(self) -> Task:
        return self.meta.task

    @property
    def prompt(self) -> PromptTokens:
        return self.meta.prompt_tokens


SPACE_DESCRIPTIONS = {
    "output": "",
    "last-block": "",
    "label-rows": ", the output layer's rows of the label words' tokens only",
    "sketch": ", sketched as A G Bᵀ (A: R x V, B: R x d, N(0, 1/R) entries from sketch_seed)",
}


def release_space(meta: ReleaseMeta) -> GradientSpace:
    """The :class:`GradientSpace` of a release, rebuilt from its public record."""
    return GradientSpace.of(
        meta.match_params, meta.prompt_tokens.label_ids, meta.model.vocab_rows,
        meta.model.hidden_size, meta.config.sketch_dim, meta.config.sketch_seed,
    )  # fmt: skip


def sample_per_class(
    labels: list[int],
    names: tuple[str, ...],
    n: int,
    seed: int,
    exclude: list[int] | None = None,
) -> list[list[int]]:
    """Indices of ``n`` examples of each class, drawn without replacement (seeded, stratified),
    never from ``exclude`` (the dev slice)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    allowed = np.ones(len(labels_arr), dtype=bool)
    allowed[exclude or []] = False
    picked = []
    for c, name in enumerate(names):
        pool = np.flatnonzero((labels_arr == c) & allowed)
        if len(pool) < n:
            raise UserError(
                f"class {c} ({name!r}) has {len(pool)} examples, fewer than the {n} requested"
            )
        picked.append(sorted(rng.choice(pool, size=n, replace=False).tolist()))
    return picked


def example_gradients(
    lm: LoadedModel,
    prompts: list[list[int]],
    classes: list[int],
    labels: LabelTokens,
    batch_size: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form inputs of per-example output-layer gradients.

    Each prompt is followed by its class's label word (teacher-forced) and right-padded (and
    masked): with causal attention the padding never influences a real position, so batching is
    exact. Returns (N, K, V) residuals ``r``, (N, K, d) hidden states ``h`` at the label
    positions and (N, K) position weights ``w``; the gradient of example ``i`` is
    ``(Σ_k w_ik r_ik h_ikᵀ, Σ_k w_ik r_ik)`` (see :mod:`gradmm.core.matching`).
    """
    rs, hs = [], []
    labels = labels.to(lm.device)
    for start in range(0, len(prompts), batch_size):
        cls = classes[start : start + batch_size]
        batch = labels.batch(prompts[start : start + batch_size], cls)
        ids, mask, pos = (t.to(lm.device) for t in batch)
        with torch.no_grad():
            hidden = final_hidden(lm.model, input_ids=ids, attention_mask=mask)
        h = hidden[torch.arange(len(cls), device=lm.device)[:, None], pos]  # (n, K, d)
        rs.append(residuals(lm.output.logits(h), labels.ids[cls]))
        hs.append(h)
    return torch.cat(rs), torch.cat(hs), labels.weights[classes]


def summed_autograd_grads(
    lm: LoadedModel,
    params: dict[str, Tensor],
    prompts: list[list[int]],
    classes: list[int],
    labels: LabelTokens,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Σ_i of the per-example gradients w.r.t. ``params``, one backward per batch.

    Inputs are detached embeddings (as for synthetic sequences): for a tied output layer only
    its output use is differentiated.
    """
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    labels = labels.to(lm.device)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for start in range(0, len(prompts), batch_size):
            cls = classes[start : start + batch_size]
            batch = labels.batch(prompts[start : start + batch_size], cls)
            ids, mask, pos = (t.to(lm.device) for t in batch)
            emb = lm.embeddings[ids].detach()
            logits = lm.model(inputs_embeds=emb, attention_mask=mask).logits
            logits = logits[torch.arange(len(cls), device=lm.device)[:, None], pos]  # (n, K, V)
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.ids[cls].flatten(), reduction="none"
            )
            loss = (ce.reshape(len(cls), -1) * labels.weights[cls]).sum()
            for name, g in zip(params, torch.autograd.grad(loss, list(params.values())),
                               strict=True):  # fmt: skip
                sums[name] += g
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return sums


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
    if check_output_dir(out, RELEASE_DIR):
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
                f"{out} already holds a DP release; it is never redrawn (use a new --out and "
                "compose the two with `gradmm privacy`)"
            )
        if not overwrite:
            raise UserError(f"{out} already holds a release (pass --overwrite to replace it)")
    task = load_task(config.task)
    if config.preset == "paper":
        task = paper.paper_task(task)
    # recorded with the release's task: generate and filter cut alike (finetune and evaluate
    # load the task by name: a task file's max_text_tokens reaches them, this option does not)
    if config.max_text_tokens is not None:
        task = task.model_copy(update={"max_text_tokens": config.max_text_tokens})
    if dp is not None:
        protected = config.n_per_class * task.num_classes  # the pool, or the split it samples
        if config.sampling_rate is not None:
            protected = round(protected / config.sampling_rate)
        note = delta_warning(dp.delta, protected)
        if note:
            warn(note)
    resolved = Path(resolve_model_name(config.model)).expanduser()
    # targets are computed in fp32 (on the runtime's device)
    lm = place(load_model(config.model), Runtime(device=(runtime or Runtime()).device))
    prompt = tokenize_prompt(task, lm.tokenizer)
    if dp is not None and lm.context_length is not None:
        # a text too long for the context would stop the release only if it were sampled, and
        # the stop would say so: a DP release cuts every text to fit instead (public inputs only)
        fitting = lm.context_length - (len(prompt.head) + len(prompt.tail)
                                       + max(map(len, prompt.label_ids)) - 1)  # fmt: skip
        if fitting < 1:
            raise UserError(f"the template and label words fill the model's context "
                            f"({lm.context_length} tokens): no room for a text")  # fmt: skip
        if task.max_text_tokens is None or task.max_text_tokens > fitting:
            task = task.model_copy(update={"max_text_tokens": fitting})
            prompt = tokenize_prompt(task, lm.tokenizer)
    params = matched_parameters(lm.model, config.match_params)
    head = list(params)[:2] if lm.output.bias is not None else list(params)[:1]
    vocab_rows, hidden = lm.output.weight.shape
    if config.sketch_dim is not None and config.sketch_dim > min(vocab_rows, hidden):
        raise UserError(f"--sketch-dim {config.sketch_dim} is larger than the model's hidden size "
                        f"({hidden}) or vocabulary ({vocab_rows}): a sketch compresses, choose at "
                        f"most {min(vocab_rows, hidden)}")  # fmt: skip
    space = GradientSpace.of(config.match_params, prompt.label_ids, vocab_rows, hidden,
                             config.sketch_dim, config.sketch_seed)  # fmt: skip

    # data-independent, and may refuse the settings: decided before any private data is read
    r1, r2 = space.shape(vocab_rows, hidden)
    coordinates = task.num_classes * (r1 * r2 + (r1 if len(head) > 1 else 0))
    protection = Mechanism(type="none") if dp is None else mechanism(
        dp, config.n_per_class, coordinates, config.noise_seed, config.sampling_rate)  # fmt: skip
    split = source = planted = None
    if config.target == "noise":  # the control reads no data at all
        counts = [config.n_per_class] * task.num_classes
        shapes = {n: p.shape for n, p in params.items()}
        if not space.identity:
            r1, r2 = space.shape(vocab_rows, hidden)
            shapes = dict(zip(head, [(r1, r2), (r1,)], strict=False))
        sums = [{n: torch.zeros(shape) for n, shape in shapes.items()} for _ in counts]
    else:
        split = config.split or task.private_split
        if config.sampling == "poisson":
            examples, picked = poisson_pool(task, split, config.sampling_rate, config.data_dir,
                                            _random_bytes(config, "sampling"))  # fmt: skip
            counts = [config.n_per_class] * task.num_classes  # the sample's sizes stay private
        else:
            examples, picked = private_pool(task, split, config.n_per_class, config.seed,
                                            config.data_dir)  # fmt: skip
            counts = None
        if config.canary_file is not None:  # an audit: planted rows always join the pool
            before = [len(ix) for ix in picked]
            examples, picked = planted_pool(task, examples, picked, config.canary_file)
            planted = [len(ix) - n for ix, n in zip(picked, before, strict=True)]
            counts = [n + k for n, k in zip(counts or before, planted, strict=True)]
        counts = counts or [len(ix) for ix in picked]
        source = f"{task.name}/{Path(examples.source).name}"
        sums = _class_sums(lm, prompt, params, head, space, examples, picked, config, dp)

    if dp is None:
        per_class = [{n: g / k for n, g in s.items()} for s, k in zip(sums, counts, strict=True)]
    else:
        per_class = _add_noise(sums, protection, config)

    tensors = {name: torch.stack([t[name] for t in per_class]).contiguous() for name in params}
    meta = ReleaseMeta(
        format=RELEASE_FORMAT,
        gradmm_version=__version__,
        task=task,
        target=config.target,
        split=split,
        data_source=source,
        model=ModelInfo(
            name=config.model,
            # the folder the name resolved to (`reference` is the shipped LM, never ./reference)
            path=str(resolved.resolve()) if resolved.exists() else None,
            fingerprint=fingerprint(lm.model),
            vocab_rows=int(lm.output.weight.shape[0]),
            hidden_size=int(lm.output.weight.shape[1]),
            has_bias=lm.output.bias is not None,
            tied=lm.output.tied,
        ),
        prompt_tokens=prompt,
        counts=counts,
        seed=config.seed,
        config=config,
        description=(
            "per-class mean over the sampled examples of the gradient of the mean CE of the "
            "label word's tokens after the template (teacher-forced) w.r.t. the matched "
            "parameters, at the model's weights, fp32"
            + SPACE_DESCRIPTIONS[config.match_params]
            + ("" if dp is None else ", each example clipped to norm C there, Gaussian noise")
            + (
                ""
                if config.canary_file is None
                else "; AUDIT RELEASE: canary rows were planted in the pool (see the counts)"
            )
        ),
        match_params=config.match_params,
        parameters=list(params),
        output_params=OutputParams(weight=head[0], bias=head[1] if len(head) > 1 else None),
        mechanism=protection,
        planted=planted,
        targets_sha256="",
    )
    with staged_dir(out, RELEASE_DIR) as tmp:
        save_file(tensors, str(tmp / "targets.safetensors"))
        meta.targets_sha256 = hashlib.sha256((tmp / "targets.safetensors").read_bytes()).hexdigest()
        record = meta.model_dump(mode="json")
        meta.record_sha256 = record["record_sha256"] = record_digest(record)
        write_json(tmp / "release.json", record)
    return Release(out, meta, tensors)


def _add_noise(sums: list[dict[str, Tensor]], protection: Mechanism, config) -> list[dict]:
    """``(S_c + N(0, σ² I)) / n`` for every class and parameter: one draw over all of them, by
    the recorded sampler: exactly (:func:`~gradmm.privacy.accounting.exact_gaussian`), or float64
    noise from :func:`~gradmm.privacy.accounting.gaussian_noise` (the OS CSPRNG, or a recorded
    seed for simulations) added in float64. Rounded once to fp32.
    """
    flat = torch.cat([g.double().flatten() for s in sums for g in s.values()]).numpy()
    if protection.sampler == EXACT_SAMPLER:
        noisy_flat = exact_gaussian(flat, protection.sigma_sum, protection.sensitivity)
    else:
        sizes = [g.numel() for s in sums for g in s.values()]  # drawn in this order, as ever
        noise = gaussian_noise(sizes, protection.sigma_sum, _random_bytes(config, "noise"))
        noisy_flat = flat + np.concatenate(noise)
    noisy_flat = torch.from_numpy(noisy_flat)
    out, start = [], 0
    for s in sums:
        noisy = {}
        for name, g in s.items():
            total = noisy_flat[start : start + g.numel()].reshape(g.shape)
            noisy[name] = (total / protection.normaliser).to(g.dtype)
            start += g.numel()
        out.append(noisy)
    return out


def private_pool(
    task: Task, split: str, n_per_class: int, seed: int, data_dir: str | None
) -> tuple[Examples, list[list[int]]]:
    """The private split and, per class, the indices of the pool a release with these settings
    reads: ``n_per_class`` per class, seeded, never from the dev slice. The one definition of the
    pool (release, audit and the experiment's ``real_private`` baseline all use it)."""
    examples = load_examples(task, split, data_dir)
    exclude = private_pool_exclusions(task, split, examples)
    return examples, sample_per_class(examples.labels, task.label_names, n_per_class, seed, exclude)


def poisson_pool(
    task: Task, split: str, rate: float, data_dir: str | None, random_bytes: Callable[[int], bytes]
) -> tuple[Examples, list[list[int]]]:
    """The private split and, per class, the indices of a Poisson sample: every row outside the
    dev slice kept independently with probability ``rate``, decided by ``random_bytes`` (the OS
    CSPRNG for a real release: the amplification needs a sample nobody can predict)."""
    examples = load_examples(task, split, data_dir)
    excluded = set(private_pool_exclusions(task, split, examples))
    if excluded and len(examples.labels) < 2 * task.dev_size:
        warn(f"{examples.source} has {len(examples.labels)} rows, fewer than twice the dev slice's "
             f"{task.dev_size}: the slice is half the split, so one row added or removed may "
             "also move another row across it, and the guarantee holds for groups of two rows "
             "(docs/privacy.md)")  # fmt: skip
    kept = uniforms(len(examples.labels), random_bytes) < rate
    picked = [[] for _ in task.label_names]
    for i, (label, keep) in enumerate(zip(examples.labels, kept, strict=True)):
        if keep and i not in excluded:
            picked[label].append(i)
    return examples, picked


def planted_pool(task: Task, examples: Examples, picked: list[list[int]],
                 canary_file: str | Path) -> tuple[Examples, list[list[int]]]:  # fmt: skip
    """The pool with the rows of ``canary_file`` added to their classes (canary audits)."""
    extra = examples_from_rows(task, read_jsonl_numbered(Path(canary_file)), canary_file)
    start = len(examples.texts)
    merged = Examples(examples.texts + extra.texts, examples.labels + extra.labels,
                      examples.source)  # fmt: skip
    picked = [list(ix) for ix in picked]
    for j, label in enumerate(extra.labels):
        picked[label].append(start + j)
    return merged, picked


def _random_bytes(config: ReleaseConfig, purpose: str) -> Callable[[int], bytes]:
    """Random bytes for ``purpose`` (noise, sampling): the OS CSPRNG, or a simulation's seeded
    stream, keyed by the purpose too (the sample and the noise never share draws)."""
    if config.noise_seed is None:
        return secrets.token_bytes
    public = config.public_fields()
    return seeded_stream(config.noise_seed, public if purpose == "noise" else [public, purpose])


def private_pool_exclusions(task: Task, split: str, examples: Examples) -> list[int]:
    """Rows of ``examples`` (the ``split``) a private pool may not use: the dev slice, when
    sampling from the private split."""
    return dev_indices(examples, task.dev_size) if split == task.private_split else []


def check_release_settings(config: ReleaseConfig) -> DPSettings | None:
    """The checks of a release's settings that need neither the model nor data (run first by
    every command that releases); the DP settings, or None for a non-DP release."""
    if not config.private:
        return None
    if config.match_params == "last-block":
        raise UserError("DP releases need closed-form clipping: --match-params output, "
                        "label-rows or sketch")  # fmt: skip
    check_settings(config.epsilon, config.delta)
    return DPSettings(
        epsilon=config.epsilon, delta=config.delta, clip=config.clip,
        neighbouring=config.neighbouring,
    )  # fmt: skip


def _class_sums(lm, prompt, params, head, space, examples, picked, config, dp) -> list[dict]:
    """Per class, the sum over its sampled examples of the (clipped, if DP) gradients, in
    ``space`` (clipped there too: the sensitivity is that of what is released)."""
    ctx = lm.context_length
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    fixed = len(prompt.head) + len(prompt.tail) + labels.length - 1  # template and label feed
    sums = []
    for c, indices in enumerate(tqdm(picked, desc="release: class targets", unit="class")):
        seqs = []
        for i in indices:
            seq = prompt.encode(lm.tokenizer, examples.texts[i])
            if ctx is not None and len(seq) + labels.length - 1 > ctx:
                raise UserError(  # non-DP only: DP releases cut every text to fit
                    f"example {i} of {examples.source} is {len(seq) + labels.length - 1} tokens "
                    f"with the template and label word, longer than the model's context ({ctx}): "
                    f"pass --max-text-tokens {max(1, ctx - fixed)} to cut texts"
                )
            seqs.append(seq)
        classes = [c] * len(seqs)
        if not seqs:  # a Poisson sample may miss a class: its sum is zero (then noise)
            vocab_rows, hidden = lm.output.weight.shape
            r1, r2 = space.shape(vocab_rows, hidden)
            shapes = [(r1, r2), (r1,)] if config.match_params != "last-block" else [
                p.shape for p in params.values()]  # fmt: skip
            names = head if config.match_params != "last-block" else list(params)
            sums.append({n: torch.zeros(shape) for n, shape in zip(names, shapes, strict=False)})
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


def load_release(path: Path) -> Release:
    """Read and verify a release folder written by :func:`release_targets`.

    Any defect (missing or malformed ``release.json``, targets that do not match their sha256,
    missing or extra tensors, shapes that disagree with the task and model, NaN or infinite
    values) is a one-line :class:`UserError`: a tampered or swapped release is never used.
    """
    path = Path(path)
    if not (path / "release.json").is_file():
        raise UserError(f"no release found at {path} (expected {path / 'release.json'})")
    raw = read_json(path / "release.json")
    if not isinstance(raw, dict) or raw.get("format") != RELEASE_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise UserError(f"{path}: unsupported release format {found!r} (expected {RELEASE_FORMAT})")
    if raw.get("record_sha256") != record_digest(raw):
        raise UserError(f"{path}/release.json does not match its record_sha256 (edited)")
    try:
        meta = ReleaseMeta.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}/release.json: invalid release record: {one_line(e)}") from None
    file = path / "targets.safetensors"
    if not file.is_file():
        raise UserError(f"{path}: targets.safetensors is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.targets_sha256:
        raise UserError(
            f"{file} does not match the sha256 recorded in release.json (modified or swapped)"
        )
    try:
        targets = load_safetensors(data)
    except SafetensorError as e:
        raise UserError(f"{file}: unreadable ({e})") from None
    _check_targets(path, meta, targets)
    return Release(path, meta, targets)


def released_coordinates(meta: ReleaseMeta) -> int:
    """How many numbers a (closed-form) release holds: per class, the released weight gradient
    and its bias."""
    r1, r2 = release_space(meta).shape(meta.model.vocab_rows, meta.model.hidden_size)
    return meta.task.num_classes * (r1 * r2 + (r1 if meta.model.has_bias else 0))


def record_digest(record: dict) -> str:
    """sha256 of a ``release.json`` record without its ``record_sha256`` field (canonical JSON:
    sorted keys, no spaces; Python's float repr round-trips, so a re-read record digests the
    same)."""
    rest = {k: v for k, v in record.items() if k != "record_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_targets(path: Path, meta: ReleaseMeta, targets: dict[str, Tensor]) -> None:
    if sorted(targets) != sorted(meta.parameters):
        raise UserError(f"{path}: targets hold {sorted(targets)}, not {sorted(meta.parameters)}")
    out_names = [meta.output_params.weight, meta.output_params.bias or meta.output_params.weight]
    if not set(out_names) <= set(meta.parameters):
        raise UserError(f"{path}: output_params name tensors the release does not hold")
    classes = meta.task.num_classes
    label_ids = meta.prompt_tokens.label_ids
    if len(meta.counts) != classes or len(label_ids) != classes or not all(label_ids):
        raise UserError(f"{path}: counts or label ids do not match the task's {classes} classes")
    out = meta.output_params
    if meta.match_params == "sketch" and meta.config.sketch_dim is None:
        raise UserError(f"{path}: a sketch release without its sketch_dim")
    r1, r2 = release_space(meta).shape(meta.model.vocab_rows, meta.model.hidden_size)
    expected = {out.weight: (classes, r1, r2)}
    if out.bias is not None:
        expected[out.bias] = (classes, r1)
    for name, t in targets.items():
        if t.ndim < 2 or t.shape[0] != classes:
            raise UserError(
                f"{path}: target {name!r} has shape {tuple(t.shape)}; expected one row per class "
                f"of task {meta.task.name!r} ({classes})"
            )
        if name in expected and tuple(t.shape) != expected[name]:
            raise UserError(f"{path}: target {name!r} has shape {tuple(t.shape)}, not "
                            f"{expected[name]}")  # fmt: skip
        if not torch.isfinite(t).all():
            raise UserError(f"{path}: target {name!r} contains NaN or infinite values")


def load_release_model(release: Release, runtime: Runtime | None = None) -> LoadedModel:
    """The model ``release`` was computed with, refused if its weights or shapes differ, then
    placed on ``runtime``'s device and dtype."""
    info = release.meta.model
    # double backward through attention needs eager attention (SDPA's CPU kernel has none)
    eager = "eager" if release.meta.match_params == "last-block" else None
    # the recorded folder, else the name (a fetched model's cache may live elsewhere here)
    source = info.path if info.path and Path(info.path).exists() else info.name
    lm = load_model(source, attn_implementation=eager)
    if fingerprint(lm.model) != info.fingerprint:
        raise UserError(
            f"model {info.name!r} differs from the one the release was computed with "
            "(fingerprint mismatch)"
        )
    if tokenize_prompt(release.task, lm.tokenizer) != release.prompt:
        raise UserError(f"{release.path}/release.json: its prompt_tokens are not its task's "
                        "template and label words in the model's tokens (edited)")  # fmt: skip
    params = matched_parameters(lm.model, release.meta.match_params)
    if not release.space.identity:  # mapped targets: the model must still have the head's shape
        weight = release.meta.output_params.weight
        if weight not in params or tuple(params[weight].shape) != (info.vocab_rows,
                                                                   info.hidden_size):  # fmt: skip
            raise UserError(f"{release.path}: the model's output layer does not fit the release")
        return place(lm, runtime)
    for name, t in release.targets.items():
        if name not in params or tuple(t.shape[1:]) != tuple(params[name].shape):
            raise UserError(
                f"{release.path}: target {name!r} of shape {tuple(t.shape)} does not fit the "
                "model's parameters"
            )
    return place(lm, runtime)
