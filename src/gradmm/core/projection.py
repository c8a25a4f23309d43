"""The z-step: from continuous embeddings to readable tokens.

``Proj(v)`` is greedy, left to right, in one of two orders:

* ``cosine-first`` (the authors' released code, docs/authors-code.md, "Projection"): at free
  position ``l`` the allowed candidates are the ``k`` vocabulary rows with the highest cosine
  to ``v_l``; among them the token the LM scores highest given the LM prefix and the tokens
  chosen so far wins;
* ``lm-first`` (how some readers describe the paper): the candidates are the LM's ``k`` most
  probable allowed next tokens, and the one of highest cosine to ``v_l`` wins; near-greedy
  decoding, so lower-perplexity text.

The LM never sees the template. We encode the prefix once and decode with a KV cache, batched
over all rows; the uncached path (the authors' computation) is kept for tests and returns the
same tokens.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from gradmm.core.lm import loss_dtype
from gradmm.core.settings import ProjectionOrder, TokenFilter
from gradmm.errors import UserError

# The authors' effective rule (docs/authors-code.md, "Token filter"): alphabetic word pieces only.
_BANNED_CHARS = set("*;:_\n-'<>{}[]()/\\|=+%@~`^#$&")
_WORD = re.compile(r"[a-z]+(['-][a-z]+)*")
_EDGE_NON_WORD = re.compile(r"^\W+|\W+$")


def _is_word_piece(text: str) -> bool:
    if len(text) > 17 or any(ch in _BANNED_CHARS for ch in text):
        return False
    core = _EDGE_NON_WORD.sub("", text.lower().strip())
    return _WORD.fullmatch(core) is not None


def allowed_tokens(tokenizer, vocab_rows: int, rule: TokenFilter = "fixed") -> Tensor:
    """(V,) bool mask of the token ids the projection may choose.

    ``paper`` reproduces the authors' filter as it is effectively applied: the word-piece rule over
    the tokenizer's base vocabulary, while embedding rows beyond it (added tokens, padding rows)
    stay allowed because of the reset bug. ``fixed`` applies the same rule but also excludes
    every row without a real token (ids >= len(tokenizer)), special tokens, and what the authors
    meant to exclude before the reset (newline, ``"``, ``#``, ``...``).
    """
    base = min(tokenizer.vocab_size, vocab_rows)
    texts = tokenizer.batch_decode([[i] for i in range(base)])
    mask = torch.tensor([_is_word_piece(t) for t in texts] + [False] * (vocab_rows - base))
    if rule == "paper":
        mask[base:] = True
        return mask
    for i, t in enumerate(texts):
        if '"' in t or "..." in t:
            mask[i] = False
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_rows]
    mask[special] = False
    mask[len(tokenizer) :] = False
    if not mask.any():
        raise UserError("the token filter leaves no allowed token in this vocabulary")
    return mask


class Projector:
    """Top-k cosine candidates + LM-ranked greedy decoding, batched over rows.

    Args:
        model: the causal LM (frozen).
        embeddings: (V, d) input embedding matrix.
        allowed: (V,) bool mask from :func:`allowed_tokens`.
        topk: candidate set size ``k`` (clamped to the number of allowed tokens).
        contexts: LM prefix token ids per class (non-empty).
        use_cache: KV-cached decoding (default) or the authors' re-encoding of the whole prefix.
        row_chunk: rows per cosine block, to bound the (rows, G, V) similarity tensor.
        order: ``cosine-first`` (the authors') or ``lm-first`` (see the module docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        embeddings: Tensor,
        allowed: Tensor,
        topk: int,
        contexts: list[list[int]],
        use_cache: bool = True,
        row_chunk: int = 64,
        order: ProjectionOrder = "cosine-first",
    ):
        if any(len(c) == 0 for c in contexts):
            raise UserError("the LM prefix used for projection must not be empty")
        self.model = model
        self.dtype = loss_dtype(embeddings.dtype)  # fp32 for a lower-precision model
        self.unit = torch.nn.functional.normalize(embeddings.detach().to(self.dtype), dim=-1)
        self.penalty = torch.where(allowed.to(embeddings.device), 0.0, float("-inf"))
        self.k = min(topk, int(allowed.sum()))
        self.contexts = contexts
        self.use_cache = use_cache
        self.row_chunk = row_chunk
        self.order = order

    @torch.no_grad()
    def candidates(self, v: Tensor) -> Tensor:
        """(N, G, d) embeddings -> (N, G, k) allowed token ids of highest cosine."""
        out = []
        for block in v.split(self.row_chunk):
            cos = torch.nn.functional.normalize(block, dim=-1) @ self.unit.T + self.penalty
            out.append(cos.topk(self.k, dim=-1).indices)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, v: Tensor, classes: Tensor) -> Tensor:
        """(N, G, d) embeddings, (N,) class of each row -> (N, G) token ids."""
        v, classes = v.to(self.dtype), classes.to(v.device)
        cand = self.candidates(v) if self.order == "cosine-first" else None
        ids = torch.empty(v.shape[:2], dtype=torch.long, device=v.device)
        for c in classes.unique().tolist():
            rows = (classes == c).nonzero(as_tuple=True)[0]
            ids[rows] = self._decode(
                v[rows], None if cand is None else cand[rows], self.contexts[c]
            )
        return ids

    def _choose(self, logits: Tensor, v_pos: Tensor, cand_pos: Tensor | None) -> Tensor:
        """(n, V) next-token logits, (n, d) targets of this position -> (n, 1) chosen ids."""
        if cand_pos is not None:  # cosine-first: the LM's favourite of the cosine candidates
            scores = logits.gather(1, cand_pos)
            return cand_pos.gather(1, scores.argmax(1, keepdim=True))
        # lm-first: the cosine favourite of the LM's k most probable allowed tokens
        top = (logits.to(self.dtype) + self.penalty).topk(self.k, dim=-1).indices  # (n, k)
        cos = torch.einsum(
            "nd,nkd->nk", torch.nn.functional.normalize(v_pos, dim=-1), self.unit[top]
        )
        return top.gather(1, cos.argmax(1, keepdim=True))

    def _decode(self, v: Tensor, cand: Tensor | None, context: list[int]) -> Tensor:
        n, length = v.shape[:2]
        seq = torch.tensor(context, device=v.device).expand(n, -1)
        chosen = []
        out = self.model(input_ids=seq, use_cache=self.use_cache, logits_to_keep=1)
        for pos in range(length):
            tok = self._choose(out.logits[:, -1], v[:, pos], None if cand is None else cand[:, pos])
            chosen.append(tok)
            if pos + 1 == length:
                break
            if self.use_cache:
                out = self.model(input_ids=tok, cache=out.cache, use_cache=True, logits_to_keep=1)
            else:
                seq = torch.cat([seq, tok], 1)
                out = self.model(input_ids=seq, use_cache=False, logits_to_keep=1)
        return torch.cat(chosen, 1)
