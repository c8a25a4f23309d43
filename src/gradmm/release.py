"""Stage 1, release: the only code in gradmm that reads private (real) examples.

It samples ``n_per_class`` examples per class from the task's private split (stratified,
seeded), computes each class's mean output-layer gradient at the model's weights and writes

* ``targets.safetensors``: one tensor per matched parameter, class dimension first;
* ``release.json``: task (with its template and verbalizer), model name and fingerprint, the
  tokenised prompt, counts, seed and how the targets were computed. No text, no statistic of the
  private examples other than the targets and counts.

Later stages read a release and public data only. The ``mechanism`` entry of ``release.json`` says
what protects the targets: ``none``, or the Gaussian mechanism of :mod:`gradmm.privacy` when
``epsilon``/``delta`` are given. ``target="noise"`` is the pure-noise control: the same noise,
no signal, and no data read at all.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from gradmm import __version__
from gradmm.errors import UserError
from gradmm.files import read_json, staged_dir, write_json
from gradmm.matching import per_example_grad_norms, residuals, summed_grads
from gradmm.models import (
    LoadedModel,
    MatchParams,
    final_hidden,
    fingerprint,
    load_model,
    matched_parameters,
    right_padded,
)
from gradmm.privacy import DPSettings, Neighbouring, check_settings, mechanism
from gradmm.tasks import (
    PromptTokens,
    Task,
    dev_indices,
    load_examples,
    load_task,
    tokenize_prompt,
)

RELEASE_FORMAT = 1


class ReleaseConfig(BaseModel):
    """Settings of ``gradmm release``."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="built-in task name or a task YAML file")
    model: str = Field(description="hub id or local folder of a causal LM")
    n_per_class: int = Field(25, ge=1, description="private examples sampled per class")
    split: str | None = Field(None, description="private split (default: the task's, 'train')")
    seed: int = 0
    data_dir: str | None = Field(None, description="folder laid out like shared/data")
    preset: Literal["default", "paper"] = "default"
    match_params: MatchParams = Field(
        "output", description="output layer (the paper) or also the last decoder block"
    )
    batch_size: int = Field(32, ge=1, description="real examples per forward pass")
    epsilon: float | None = Field(None, description="DP ε (with delta: a DP release)")
    delta: float | None = Field(None, description="DP δ")
    clip: float = Field(1.0, gt=0, description="DP per-example gradient norm bound C")
    neighbouring: Neighbouring = "replace"
    target: Literal["real", "noise"] = Field(
        "real", description="'noise': zero-signal control of the same σ; reads no data"
    )
    # Seed of the DP noise. Never recorded: whoever knows it can subtract the noise.
    noise_seed: int | None = Field(None, exclude=True)

    @property
    def private(self) -> bool:
        return self.epsilon is not None or self.delta is not None

    def public_fields(self) -> dict:
        return self.model_dump(mode="json")


@dataclass
class Release:
    """A loaded release: what generation may use."""

    path: Path
    meta: dict
    targets: dict[str, Tensor]  # parameter name -> (C, *parameter shape)
    reused: bool = False  # an existing DP release returned as it was (no new noise)

    @property
    def target_weight(self) -> Tensor:
        """(C, V, d) target of the output layer's weight."""
        return self.targets[self.meta["output_params"]["weight"]]

    @property
    def target_bias(self) -> Tensor | None:
        """(C, V) target of the output layer's bias, or None."""
        name = self.meta["output_params"]["bias"]
        return None if name is None else self.targets[name]

    @property
    def task(self) -> Task:
        return Task(**self.meta["task"])

    @property
    def prompt(self) -> PromptTokens:
        return PromptTokens(**self.meta["prompt_tokens"])


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
    lm: LoadedModel, sequences: list[list[int]], label_ids: list[int], batch_size: int = 32
) -> tuple[Tensor, Tensor]:
    """Closed-form inputs of per-example output-layer gradients.

    Sequences are right-padded (and masked): with causal attention the padding never influences
    the last real position, so batching is exact. Returns (N, V) residuals ``r`` and (N, d)
    hidden states ``h``; the gradient of example ``i`` is ``(r_i h_iᵀ, r_i)``.
    """
    rs, hs = [], []
    for start in range(0, len(sequences), batch_size):
        ids, mask, last = right_padded(sequences[start : start + batch_size])
        with torch.no_grad():
            hidden = final_hidden(lm.model, input_ids=ids, attention_mask=mask)
        h = hidden[torch.arange(len(last)), last]
        y = torch.tensor(label_ids[start : start + batch_size])
        rs.append(residuals(lm.output.logits(h), y))
        hs.append(h)
    return torch.cat(rs), torch.cat(hs)


def summed_autograd_grads(
    lm: LoadedModel,
    params: dict[str, Tensor],
    sequences: list[list[int]],
    label_ids: list[int],
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Σ_i of the per-example gradients w.r.t. ``params``, one backward per batch.

    Inputs are detached embeddings (as for synthetic sequences): for a tied output layer only
    its output use is differentiated.
    """
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask, last = right_padded(sequences[start : start + batch_size])
            emb = lm.embeddings[ids].detach()
            logits = lm.model(inputs_embeds=emb, attention_mask=mask).logits
            y = torch.tensor(label_ids[start : start + batch_size])
            ce = torch.nn.functional.cross_entropy(
                logits[torch.arange(len(last)), last], y, reduction="sum"
            )
            for name, g in zip(params, torch.autograd.grad(ce, list(params.values())), strict=True):
                sums[name] += g
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return sums


def release_targets(config: ReleaseConfig, out: Path, overwrite: bool = False) -> Release:
    """Run the release stage and write ``out``; see the module docstring.

    A DP release is never redrawn: if ``out`` already holds a release with the same settings it is
    returned as it is; different settings, or ``overwrite``, are refused (a second noisy release
    of the same examples spends more privacy: write it elsewhere and compose the two with
    ``gradmm privacy``).
    """
    out = Path(out)
    dp = _dp_settings(config)
    if (out / "release.json").exists():
        if dp is not None:
            existing = read_json(out / "release.json")
            if existing.get("config") == config.public_fields() and not overwrite:
                release = load_release(out)
                release.reused = True
                return release
            raise UserError(
                f"{out} already holds a DP release; it is never redrawn (use a new --out and "
                "compose the two with `gradmm privacy`)"
            )
        if not overwrite:
            raise UserError(f"{out} already holds a release (pass --overwrite to replace it)")
    if config.target == "noise" and dp is None:
        raise UserError("--target noise is a DP control: give --epsilon and --delta")
    if dp is not None and config.match_params != "output":
        raise UserError("DP releases support --match-params output only")
    started = time.time()
    task = load_task(config.task)
    if config.preset == "paper":
        task = task.with_paper_tokens()
    lm = load_model(config.model)
    prompt = tokenize_prompt(task, lm.tokenizer)
    params = matched_parameters(lm.model, config.match_params)
    head = list(params)[:2] if lm.output.bias is not None else list(params)[:1]

    split = source = None
    if config.target == "noise":  # the control reads no data at all
        counts = [config.n_per_class] * task.num_classes
        sums = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in counts]
    else:
        split = config.split or task.private_split
        examples = load_examples(task, split, config.data_dir)
        source = examples.source
        picked = sample_per_class(
            examples.labels, task.label_names, config.n_per_class, config.seed,
            exclude=private_pool_exclusions(task, split, len(examples.labels)),
        )  # fmt: skip
        counts = [len(ix) for ix in picked]
        sums = _class_sums(lm, prompt, params, head, examples, picked, config, dp)

    if dp is None:
        per_class = [{n: g / k for n, g in s.items()} for s, k in zip(sums, counts, strict=True)]
        protection = {"type": "none", "private": False}
    else:
        protection = mechanism(dp, config.n_per_class)
        gen = torch.Generator().manual_seed(
            config.noise_seed if config.noise_seed is not None else secrets.randbits(63)
        )
        per_class = [
            {
                n: (g + protection["sigma_sum"] * torch.randn(g.shape, generator=gen))
                / config.n_per_class
                for n, g in s.items()
            }
            for s in sums
        ]

    meta = {
        "format": RELEASE_FORMAT,
        "gradmm_version": __version__,
        "task": task.model_dump(mode="json"),
        "target": config.target,
        "split": split,
        "data_source": source,
        "model": {
            "name": config.model,
            "path": str(Path(config.model).resolve()) if Path(config.model).exists() else None,
            "fingerprint": fingerprint(lm.model),
            "vocab_rows": int(lm.output.weight.shape[0]),
            "hidden_size": int(lm.output.weight.shape[1]),
            "has_bias": lm.output.bias is not None,
            "tied": lm.output.tied,
        },
        "prompt_tokens": {"head": prompt.head, "tail": prompt.tail, "label_ids": prompt.label_ids},
        "counts": counts,
        "seed": config.seed,
        "config": config.public_fields(),
        "targets": (
            "per-class mean over the sampled examples of the gradient of CE(next token after "
            "the template, label token) w.r.t. the matched parameters, at the model's weights, "
            "fp32" + ("" if dp is None else ", each example clipped to norm C, Gaussian noise")
        ),
        "match_params": config.match_params,
        "parameters": list(params),
        "output_params": {"weight": head[0], "bias": head[1] if len(head) > 1 else None},
        "mechanism": protection,
        "seconds": round(time.time() - started, 3),
    }
    tensors = {name: torch.stack([t[name] for t in per_class]).contiguous() for name in params}
    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "targets.safetensors"))
        write_json(tmp / "release.json", meta)
    return Release(out, meta, tensors)


def private_pool_exclusions(task: Task, split: str, n_examples: int) -> list[int]:
    """Rows a private pool may not use: the dev slice, when sampling from the private split."""
    return dev_indices(n_examples, task.dev_size) if split == task.private_split else []


def _dp_settings(config: ReleaseConfig) -> DPSettings | None:
    if not config.private:
        return None
    check_settings(config.epsilon, config.delta)
    return DPSettings(
        epsilon=config.epsilon, delta=config.delta, clip=config.clip,
        neighbouring=config.neighbouring,
    )  # fmt: skip


def _class_sums(lm, prompt, params, head, examples, picked, config, dp) -> list[dict]:
    """Per class, the sum over its sampled examples of the (clipped, if DP) gradients."""
    ctx = lm.context_length
    sums = []
    for c, indices in enumerate(tqdm(picked, desc="release: class targets", unit="class")):
        seqs = []
        for i in indices:
            seq = prompt.encode(lm.tokenizer, examples.texts[i])
            if ctx is not None and len(seq) > ctx:
                raise UserError(
                    f"example {i} of {examples.source} is {len(seq)} tokens with the template, "
                    f"longer than the model's context ({ctx})"
                )
            seqs.append(seq)
        labels = [prompt.label_ids[c]] * len(seqs)
        if config.match_params == "output":
            r, h = example_gradients(lm, seqs, labels, config.batch_size)
            weights = None
            if dp is not None:  # joint clipping of (weight, bias) from closed-form norms
                norms = per_example_grad_norms(r, h, has_bias=len(head) > 1)
                weights = torch.clamp(dp.clip / norms, max=1.0)
            sums.append(dict(zip(head, summed_grads(r, h, weights), strict=False)))
        else:
            sums.append(summed_autograd_grads(lm, params, seqs, labels, config.batch_size))
    return sums


def load_release(path: Path) -> Release:
    """Read a release folder written by :func:`release_targets`."""
    path = Path(path)
    if not (path / "release.json").is_file():
        raise UserError(f"no release found at {path} (expected {path / 'release.json'})")
    meta = read_json(path / "release.json")
    if meta.get("format") != RELEASE_FORMAT:
        raise UserError(f"{path}: unsupported release format {meta.get('format')!r}")
    return Release(path, meta, load_file(str(path / "targets.safetensors")))
