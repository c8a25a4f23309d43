"""The ``paper`` preset: the authors' behaviour where gradmm deliberately differs from it.

Everything the preset changes lives here (docs/authors-code.md lists each change and why): the
tokenisation of the template and label words (:func:`paper_task`), the LM prefix of the
projection per data set (:func:`lm_prefix`), which data sets freeze the template positions
(:func:`freezes_template`) and the generate options the preset sets (:data:`GENERATE_OPTIONS`).
"""

from __future__ import annotations

from typing import Any

from gradmm.data.tasks import Task

# The authors' projection prefixes for their instruction-conditioned datasets (GRADMM
# utilities.py:get_prefix, MIT licence); used only by the `paper` preset.
_PAPER_MOVIE_INSTRUCTION = (
    "You are now a movie critic. You are provided with a sentiment label (either 'great' or "
    "'bad'). You need to write one unique sentence that reflects the given sentiment about a "
    "movie. Your writing style should be consistent with typical movie reviews. This should be a "
    "standalone sentence that could plausibly appear in a movie review. Ensure that your language "
    "is natural, casual, and reflective of genuine opinion. You must ensure that the sentiment "
    "expressed in your sentence matches the provided sentiment label. Remember to keep your tone "
    "appropriate and not violate any laws or social ethics. Please be creative and write only one "
    "sentence. The sentiment of the movie review is: {label}\n. Answer:"
)
_PAPER_IMDB_INSTRUCTION = (
    "You are now a movie critic. You are provided with a sentiment label (either 'great' or "
    "'bad'). You need to write a film review that reflects the given sentiment about a movie. "
    "Your writing style should be consistent with typical movie reviews. This should be a  highly "
    "polar review for a movie that could plausibly be posted on IMDB. Ensure that your language is "
    "natural, casual, and reflective of genuine opinion. You must ensure that the sentiment "
    "expressed in your review matches the provided sentiment label. Remember to keep your tone "
    "appropriate and not violate any laws or social ethics. Please be creative and write an unique "
    "movie review. The sentiment of the movie review is: {label}\n. Answer:"
)
_PAPER_TWEET_INSTRUCTION = (
    "You are now a person using twitter. You are provided with an emotion, and you need to write a "
    "tweet expressing that emotion. Your writing style must be consistent with the tweets on "
    "twitter. You must ensure that your language is colloquial, casual, and Twitter-like. You are "
    "given a length requirement. You must ensure that the emotion conveyed in your tweet matches "
    "the emotion provided and meets the length requirement. This is an academic study and the "
    "content you generate will not be used for anything that violates the law or social ethics. "
    "Write a tweet expressing the emotion and ensure the tweet is within the usual length. "
    "Remember to make sure that your language is colloquial, casual, and Twitter-like. Please be "
    "creative and write only one unique tweets. The emotion of twitter is: {label}\n. Answer:"
)

# `paper` preset: the authors' LM prefix per data set ("The" for SST-2, an instruction that names
# the label word for the others). The label word there is "great"/"bad", i.e. our label word.
PAPER_LM_PREFIX: dict[str, str] = {
    "sst2": "The",
    "rotten_tomatoes": _PAPER_MOVIE_INSTRUCTION,
    "imdb": _PAPER_IMDB_INSTRUCTION,
    "tweet_emotion": _PAPER_TWEET_INSTRUCTION,
}
# Datasets on which the authors' code zeroes the template positions' gradient
# (docs/authors-code.md, "Template freezing").
PAPER_FREEZES_TEMPLATE = {"rotten_tomatoes", "imdb"}


# Values of generate options the preset sets, unless given explicitly (``default``'s are ours).
GENERATE_OPTIONS: dict[str, Any] = {
    "init": "random",
    "select": "augmented",
    "token_filter": "paper",
    "score_init_scaled": False,
    "init_scale": 1.4,
    "length": 27,  # gen_max_tokens = 30 minus the 3-token " It was " template
}


def paper_task(task: Task) -> Task:
    """The authors' generation convention: a trailing space after the template, label words
    without their leading space, first token of each (docs/authors-code.md, "Prompts and label
    words")."""
    return task.model_copy(
        update={
            "template": task.template + " ",
            "label_words": tuple(w.lstrip() for w in task.label_words),
            "label_token_policy": "first",
        }
    )


def lm_prefix(task: Task) -> str | None:
    """The authors' LM prefix of the projection for ``task`` (None: not one of their data sets)."""
    return PAPER_LM_PREFIX.get(task.name)


def freezes_template(task: Task) -> bool:
    """Whether the authors' code zeroes the template positions' gradient on ``task``."""
    return task.name in PAPER_FREEZES_TEMPLATE
