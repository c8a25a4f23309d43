"""A task's template and label words as token ids, and the label positions of a batch.

An example ``(s, c)`` becomes ``head + tokens(s) + tail`` followed by the label word of ``c``
(:class:`PromptTokens`); the label word may be several tokens, teacher-forced, and the model's
hidden states at the positions that predict them are what every gradient and score is made of
(:class:`LabelTokens`, :func:`label_hidden`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradmm.core.lm import LoadedModel, final_hidden, right_padded
from gradmm.core.settings import TEXT_SLOT, LabelScore
from gradmm.errors import UserError

if TYPE_CHECKING:
    from gradmm.data.tasks import Task


@dataclass(frozen=True)
class PromptTokens:
    """A task's template and verbalizer in one tokenizer's ids.

    The model input for text ``s`` is ``head + tokens(s) + tail``; the label word of class ``c``
    is the token sequence ``label_ids[c]`` (one token or more) that follows it. Pieces are
    tokenised separately (no special tokens), so real and synthetic sequences share exactly the
    same template ids.
    """

    head: list[int]
    tail: list[int]
    label_ids: list[list[int]]
    label_score: LabelScore = "sum"  # over a label word's tokens: "sum" or "mean"
    max_text_tokens: int | None = None  # texts are cut to their first this many tokens

    def encode(self, tokenizer, text: str) -> list[int]:
        return self.head + encode_text(tokenizer, text)[: self.max_text_tokens] + self.tail

    def demonstrations(self, tokenizer, examples: list[tuple[str, int]]) -> list[int]:
        """Ids of in-context demonstrations: per ``(text, class)``, the prompt, the whole label
        word and a newline."""
        newline = encode_text(tokenizer, "\n")
        ids: list[int] = []
        for text, c in examples:
            ids += self.encode(tokenizer, text) + self.label_ids[c] + newline
        return ids


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompt(task: Task, tokenizer) -> PromptTokens:
    """Tokenise the template and the label words under the task's policy; a label word missing
    from the vocabulary, or two classes with the same tokens, is a :class:`UserError`."""
    head_str, tail_str = task.template.split(TEXT_SLOT)
    head, tail = encode_text(tokenizer, head_str), encode_text(tokenizer, tail_str)
    label_ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for word in task.label_words:
        ids = encode_text(tokenizer, word)
        if not ids or (unk is not None and unk in ids):
            raise UserError(f"label word {word!r} is missing from the tokenizer's vocabulary")
        label_ids.append(ids[:1] if task.label_token_policy == "first" else ids)
    if len(set(map(tuple, label_ids))) != len(label_ids):
        which = "first tokens" if task.label_token_policy == "first" else "tokens"
        raise UserError(f"label words {list(task.label_words)} do not map to distinct {which}")
    return PromptTokens(
        head=head,
        tail=tail,
        label_ids=label_ids,
        label_score=task.label_score,
        max_text_tokens=task.max_text_tokens,
    )


@dataclass(frozen=True)
class LabelTokens:
    """Every class's label word as next-token targets, right-padded to the longest (``K`` tokens).

    A sequence of class ``c`` is followed by :meth:`feed` ``(c)``, its label word but the last
    token (teacher forcing), padded to ``K − 1`` ids. Its last ``K`` positions then predict
    ``ids[c]``, position ``k`` the word's ``k``-th token, and its loss is the cross-entropy of
    the word's ``K_c`` tokens, summed or (``score="mean"``) averaged: ``weights[c, k]`` is 1 or
    ``1/K_c``, and 0 at padding (causal attention: padding never changes an earlier position).
    With one-token label words (``K = 1``) both are the next-token loss at the last position.
    """

    ids: Tensor  # (C, K) label token ids, padded with 0
    weights: Tensor  # (C, K) 1 or 1/K_c at the class's label positions, 0 at padding

    @classmethod
    def of(cls, label_ids: Sequence[Sequence[int]], score: LabelScore = "sum") -> LabelTokens:
        """From the label words' token ids and score (``PromptTokens.label_ids/label_score``)."""
        length = max(map(len, label_ids))
        ids = torch.zeros(len(label_ids), length, dtype=torch.long)
        weights = torch.zeros(len(label_ids), length)
        for c, word in enumerate(label_ids):
            ids[c, : len(word)] = torch.tensor(list(word))
            weights[c, : len(word)] = 1.0 / len(word) if score == "mean" else 1.0
        return cls(ids, weights)

    @property
    def length(self) -> int:
        """``K``, the label positions of every sequence."""
        return self.ids.shape[1]

    def to(self, device: torch.device | str) -> LabelTokens:
        return LabelTokens(self.ids.to(device), self.weights.to(device))

    def feed(self, c: int) -> list[int]:
        """The ``K − 1`` ids that follow a sequence of class ``c``."""
        return self.ids[c, :-1].tolist()

    def batch(self, prompts: list[list[int]], classes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Each prompt followed by its class's :meth:`feed`: (N, L) right-padded ids, (N, L)
        attention mask and (N, K) positions of the label tokens' predictions."""
        ids, mask, last = right_padded(
            [p + self.feed(c) for p, c in zip(prompts, classes, strict=True)]
        )
        return ids, mask, last[:, None] - (self.length - 1) + torch.arange(self.length)


def label_hidden(
    lm: LoadedModel,
    labels: LabelTokens,
    prompts: list[list[int]],
    classes: list[int],
    detached_embeddings: bool = False,
) -> Tensor:
    """(N, K, d) hidden states, in the model's dtype, at the positions that predict the label
    tokens of each prompt's class: each prompt followed by its class's :meth:`LabelTokens.feed`,
    right-padded, one forward pass (the one definition release, filter and evaluate share).

    ``detached_embeddings``: feed input embeddings detached, as synthetic sequences are fed, so
    that the gradient of a tied output layer is that of its output use only.
    """
    ids, mask, pos = (t.to(lm.device) for t in labels.batch(prompts, classes))
    if detached_embeddings:
        embeds = lm.embeddings[ids].detach()
        hidden = final_hidden(lm.model, inputs_embeds=embeds, attention_mask=mask)
    else:
        hidden = final_hidden(lm.model, input_ids=ids, attention_mask=mask)
    return hidden[torch.arange(len(prompts), device=lm.device)[:, None], pos]
