"""Loading a causal LM and finding its output layer.

GRADMM matches gradients of the output layer only: ``logits = W h + b`` with ``W ∈ R^{V×d}``
(the ``lm_head``, possibly tied to the input embeddings) and an optional bias ``b ∈ R^V``. For
a tied matrix only its output-layer use is differentiated (the input embeddings are constants).
:func:`final_hidden` returns ``h``, the output layer's input, so that every stage can compute
logits and closed-form gradients itself.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradmm.core.settings import MatchParams, Runtime
from gradmm.errors import UserError

if TYPE_CHECKING:
    from transformers import Cache


@dataclass(frozen=True)
class OutputLayer:
    """The output layer's parameters in fp32: views of the model's tensors for an fp32 model,
    fp32 copies when the model runs in a lower precision (see :func:`place`)."""

    weight: Tensor  # (V, d)
    bias: Tensor | None  # (V,) or None
    tied: bool  # weight is the input embedding matrix

    def logits(self, h: Tensor) -> Tensor:
        """(..., d) hidden states (any dtype) -> (..., V) logits in the layer's dtype (fp32)."""
        return torch.nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses and optimiser state use beside a model of ``dtype``: fp32, or fp64 for
    an fp64 model (the tests' exact comparisons)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (hub id or folder)
    output: OutputLayer

    @cached_property
    def embeddings(self) -> Tensor:
        """(V_in, d) what the model's input embedding module returns for each token id: the
        ``inputs_embeds`` equivalent of ``input_ids`` (see :func:`input_embedding_matrix`)."""
        return input_embedding_matrix(self.model)

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )


def place(lm: LoadedModel, runtime: Runtime | None) -> LoadedModel:
    """Move ``lm`` to the runtime's device and dtype (in place; returns it). The output layer
    stays fp32 (a copy when the model's dtype is lower)."""
    if runtime is None:
        return lm
    lm.model.to(device=runtime.torch_device(), dtype=runtime.torch_dtype())
    out = output_layer(lm.model)
    dtype = loss_dtype(out.weight.dtype)
    lm.output = OutputLayer(
        weight=out.weight.to(dtype),
        tied=out.tied,
        bias=None if out.bias is None else out.bias.to(dtype),
    )
    lm.__dict__.pop("embeddings", None)  # recomputed on the new device
    return lm


def output_layer(model: torch.nn.Module) -> OutputLayer:
    """Find the output layer; a model without a linear one over the vocabulary is a UserError."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise UserError(
            f"{type(model).__name__} has no linear output layer over the vocabulary "
            "(a causal LM with an lm_head is required)"
        )
    emb = model.get_input_embeddings()
    tied = emb is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise UserError(f"models with {attr} are not supported (logits must be W h + b)")
    return OutputLayer(weight=head.weight, bias=head.bias, tied=tied)


@torch.no_grad()
def check_logits_are_the_output_layers(model: torch.nn.Module, layer: OutputLayer) -> None:
    """Every stage computes logits as ``W h + b`` from :func:`final_hidden`: refuse a model whose
    own forward does something else (a scaling or capping :func:`output_layer` does not know by
    name). Run once on loading, in fp32."""
    device = layer.weight.device
    probe = torch.arange(1, 5, device=device)[None] % layer.weight.shape[0]
    own = model(input_ids=probe).logits.float()
    ours = layer.logits(final_hidden(model, input_ids=probe)).float()
    if not torch.allclose(own, ours, rtol=1e-3, atol=1e-3 * float(own.abs().max()) + 1e-5):
        raise UserError(
            f"{type(model).__name__}'s logits are not W h + b of its output layer "
            "(a scaled or capped head is not supported)"
        )


def matched_parameters(model: torch.nn.Module, which: MatchParams = "output") -> dict[str, Tensor]:
    """The parameters whose gradient is matched, by their names in ``model``.

    ``output``: the output layer's weight (and bias), as in the paper (``label-rows`` and
    ``sketch`` release a map of their gradient: :class:`gradmm.core.matching.GradientSpace`).
    ``last-block``: those plus every parameter of the last decoder block (the longest
    ``ModuleList`` of the model).
    """
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    params = {f"{head_name}.weight": head.weight}
    if head.bias is not None:
        params[f"{head_name}.bias"] = head.bias
    if which == "last-block":
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        if not lists:
            raise UserError(f"{type(model).__name__}: no list of decoder blocks found")
        name, blocks = max(lists, key=lambda nm: len(nm[1]))
        last = f"{name}.{len(blocks) - 1}"
        params.update({f"{last}.{n}": p for n, p in blocks[-1].named_parameters()})
    return params


@torch.no_grad()
def input_embedding_matrix(model: torch.nn.Module, chunk: int = 8192) -> Tensor:
    """(V_in, d) the input embedding module's output for every token id, detached.

    For most models that is the embedding table itself (returned as is, no copy). Some scale it
    inside the module (Gemma 3 multiplies by sqrt(d)); ``inputs_embeds`` must then be the scaled
    rows, so the scaled table is computed once, in chunks.
    """
    module = model.get_input_embeddings()
    weight = module.weight.detach()
    # rows spread over the vocabulary (the first ones are often zero padding rows)
    probe = torch.linspace(0, weight.shape[0] - 1, 64).long().unique()
    scaled = getattr(module, "embed_scale", None) is not None
    if not scaled and torch.equal(module(probe), weight[probe]):
        return weight
    return torch.cat([module(ids) for ids in torch.arange(weight.shape[0]).split(chunk)])


def right_padded(
    sequences: list[list[int]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """(N, L) right-padded ids, (N, L) attention mask, (N,) last real position of each row, on
    ``device``.

    With causal attention the padding never influences the real positions, so batching
    sequences of different lengths this way is exact.
    """
    last = torch.tensor([len(s) - 1 for s in sequences])
    ids = torch.zeros(len(sequences), int(last.max()) + 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device), last.to(device)


def final_hidden(
    model: torch.nn.Module,
    *,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    prefix: Cache | None = None,
) -> Tensor:
    """(N, L) ids or (N, L, d) embeddings (any float dtype: cast to the model's) -> (N, L, d)
    hidden states at the output layer's input, in the model's dtype. ``prefix``: the cache of a
    sequence every row continues (:func:`prefix_cache`; copied, not modified)."""
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.to(model.dtype)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        rows = len(input_ids if input_ids is not None else inputs_embeds)
        cache.batch_repeat_interleave(rows)
        if attention_mask is not None:
            seen = attention_mask.new_ones(rows, cache.get_seq_length())
            attention_mask = torch.cat([seen, attention_mask], dim=1)
    out = _transformer(model)(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state


@torch.no_grad()
def prefix_cache(model: torch.nn.Module, prefix: list[int]) -> Cache | None:
    """The keys and values of one ``prefix`` (token ids), for :func:`final_hidden` to run many
    sequences after it without recomputing it (few-shot demonstrations); no gradient flows into
    them. None for a model without a cache that can be repeated over a batch."""
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    cache = getattr(_transformer(model)(input_ids=ids, use_cache=True), "cache", None)
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def _transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder under the LM head (through a PEFT wrapper: LoRA layers stay in place)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, shape, dtype, bytes), in name order."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape first: a 0-dim buffer (Gemma 3's embed_scale) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
