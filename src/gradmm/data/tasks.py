"""Tasks: where the labelled text comes from and how an example becomes a next-token problem.

A task is a data source (local ``{"text","label"}`` JSONL/CSV files laid out like
``shared/data``, or a Hugging Face dataset), a template with a ``{text}`` slot, and a
verbalizer: one label word per class. An example ``(s, c)`` becomes the token sequence
``head + tokens(s) + tail`` (``head``/``tail`` = the template around ``{text}``) and its loss is
the cross-entropy of the next token after ``tail`` against the label word of ``c``.

A label word may be several tokens of the model's tokenizer (policy ``"all"``, the default): the
word is teacher-forced after the template, the class score is its log-probability (``label_score:
sum``, the default) or its tokens' mean log-probability (``mean``, length-normalised) and the
example's loss is the matching sum or mean of the tokens' cross-entropies. The ``"first"`` policy
(what the authors' code does) keeps the first token only and is recorded in every release; it
refuses two classes whose label words share a first token.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradmm.core.settings import TEXT_SLOT, LabelScore, LabelTokenPolicy
from gradmm.errors import UserError
from gradmm.files import read_json, read_jsonl_numbered, read_yaml
from gradmm.options import one_line


class HubSource(BaseModel):
    """A dataset on the Hugging Face hub (used when no local data folder is given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    name: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    splits: dict[str, str] = {}  # our split name -> hub split name, when they differ


class Task(BaseModel):
    """A classification task: built-ins in :data:`BUILTIN_TASKS`, custom ones from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str = "{text} It was"
    # LM context of the projection (the LM never sees the template); {label} = the label word.
    # With chat_template, it is rendered as a user turn of the tokenizer's chat template (for
    # instruct models), and the projection continues the assistant's reply.
    lm_prefix: str = "The"
    chat_template: bool = False
    # Hand-written, public examples (text, class): the few-shot classifier of `gradmm filter`
    # and the LM-prompted baseline. Never private data; None: methods that need them refuse.
    demonstrations: tuple[tuple[str, int], ...] | None = None
    local_dir: str | None = None  # folder under the data dir, or an absolute path
    hub: HubSource | None = None
    private_split: str = "train"
    test_split: str = "test"
    # Model-selection (dev) examples: a fixed slice of the private split, chosen row by row by a
    # keyed hash, that private pools never draw from (see ``dev_indices``).
    dev_size: int = 500
    # The judge slice: the rows ranked next after the dev slice by the same keyed hash, never in
    # any private pool either; the quality measure's independent classifier trains on it
    # (``judge_indices``). 0: no judge (label fidelity is not measured).
    judge_size: int = Field(0, ge=0)
    label_token_policy: LabelTokenPolicy = "all"
    # A label word's score: the log-probability of its tokens, summed (the word's probability) or
    # averaged (length-normalised); the training loss is the matching sum or mean of their CEs.
    label_score: LabelScore = "sum"
    # Texts longer than this many tokens are cut to their first max_text_tokens (None: never;
    # a text that does not fit the model's context is then an error). Recorded in releases.
    max_text_tokens: int | None = Field(None, ge=1)

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if v.count(TEXT_SLOT) != 1:
            raise ValueError(f"template must contain the text slot {TEXT_SLOT} exactly once: {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if len(self.label_names) < 2:
            raise ValueError("a task needs at least 2 classes")
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"{len(self.label_words)} label words for {len(self.label_names)} classes"
            )
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError("label words must be distinct")
        if self.local_dir is None and self.hub is None:
            raise ValueError("a task needs a data source: local_dir or hub")
        if self.demonstrations is not None:
            labels = {y for _, y in self.demonstrations}
            if not labels <= set(range(len(self.label_names))):
                raise ValueError("demonstrations: labels must index label_names")
            if labels != set(range(len(self.label_names))):
                raise ValueError("demonstrations: give at least one per class")
        return self

    def require_demonstrations(self, purpose: str) -> tuple[tuple[str, int], ...]:
        """The task's public demonstrations; a :class:`UserError` naming ``purpose`` if none."""
        if self.demonstrations is None:
            raise UserError(
                f"task {self.name!r} has no demonstrations, which {purpose} needs: add public, "
                "hand-written `demonstrations: [[text, label], ...]` (one per class at least) to "
                "its YAML"
            )
        return self.demonstrations

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# Hand-written, public demonstrations of the built-in tasks (never private data).
SENTIMENT_DEMONSTRATIONS = (
    ("a warm, funny and beautifully acted film", 1),
    ("a tedious mess with a script that goes nowhere", 0),
    ("one of the most moving stories of the year", 1),
    ("dull characters, flat jokes and a boring plot", 0),
)
EMOTION_DEMONSTRATIONS = (
    ("so annoyed that the bus left without me again", 0),
    ("best day ever with my friends at the beach", 1),
    ("tomorrow is a new chance, things will get better", 2),
    ("i miss you so much, the house feels empty", 3),
)

BUILTIN_TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        judge_size=10000,  # a TF-IDF judge tests at 73% on 2,000 rows, 80% on 10,000
        label_names=("negative", "positive"),
        label_words=(" bad", " great"),
        local_dir="sst2",
        hub=HubSource(path="stanfordnlp/sst2", text_field="sentence"),
        demonstrations=SENTIMENT_DEMONSTRATIONS,
        test_split="validation",  # GLUE's SST-2 test labels are not public
    ),
    "rotten_tomatoes": Task(
        name="rotten_tomatoes",
        judge_size=3000,
        label_names=("neg", "pos"),
        label_words=(" bad", " great"),
        local_dir="rotten_tomatoes",
        hub=HubSource(path="cornell-movie-review-data/rotten_tomatoes"),
        demonstrations=SENTIMENT_DEMONSTRATIONS,
    ),
    "tweet_emotion": Task(
        name="tweet_emotion",
        judge_size=1000,
        label_names=("anger", "joy", "optimism", "sadness"),
        label_words=(" anger", " joy", " optimism", " sadness"),
        template="{text} The emotion of this tweet is",
        lm_prefix="I",
        local_dir="tweet_eval_emotion",
        hub=HubSource(path="cardiffnlp/tweet_eval", name="emotion"),
        demonstrations=EMOTION_DEMONSTRATIONS,
    ),
    "imdb": Task(
        name="imdb",
        judge_size=5000,
        label_names=("neg", "pos"),
        label_words=(" bad", " great"),
        local_dir="imdb",
        hub=HubSource(path="stanfordnlp/imdb"),
        demonstrations=SENTIMENT_DEMONSTRATIONS,
    ),
}


def load_task(name_or_path: str) -> Task:
    """A built-in task by name, or a custom task from a YAML file (fields of :class:`Task`)."""
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        spec = read_yaml(path, "task")
        if not isinstance(spec, dict):
            raise UserError(f"{path}: expected a mapping of task fields")
        spec.setdefault("name", path.stem)
        if spec.get("local_dir") is not None:
            spec["local_dir"] = str((path.parent / spec["local_dir"]).resolve())
        try:
            return Task(**spec)
        except ValidationError as e:
            raise UserError(f"{path}: invalid task: {one_line(e)}") from None
    known = ", ".join(sorted(BUILTIN_TASKS))
    raise UserError(f"unknown task {name_or_path!r} (built-in: {known}; or a .yaml task file)")


# --------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Examples:
    """Labelled texts of one split. ``labels[i]`` indexes ``Task.label_names``."""

    texts: list[str]
    labels: list[int]
    source: str  # file path or hub id, for error messages and manifests


def data_dir_from_env(data_dir: str | Path | None) -> Path | None:
    """``--data-dir`` if given, else ``$GRADMM_DATA_DIR``, else None (use the hub)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("GRADMM_DATA_DIR")
    return Path(env) if env else None


def load_examples(task: Task, split: str, data_dir: str | Path | None = None) -> Examples:
    """Load one split of ``task``, validated: non-empty texts, labels within the task's classes."""
    root = data_dir_from_env(data_dir)
    local = Path(task.local_dir) if task.local_dir is not None else None
    if local is not None and (root is not None or local.is_absolute()):
        return _load_local(task, local if local.is_absolute() else root / local, split)
    if task.hub is None:
        raise UserError(
            f"task {task.name!r} has no hub source: pass --data-dir or set GRADMM_DATA_DIR"
        )
    return _load_hub(task, split)


def _load_local(task: Task, folder: Path, split: str) -> Examples:
    if not folder.is_dir():
        raise UserError(f"data folder not found for task {task.name!r}: {folder}")
    labels_file = folder / "labels.json"
    if labels_file.exists():
        names = read_json(labels_file)
        if not isinstance(names, list) or len(names) != task.num_classes:
            raise UserError(
                f"{labels_file}: expected a list of {task.num_classes} label names "
                f"for task {task.name!r}"
            )
    jsonl, csv_path = folder / f"{split}.jsonl", folder / f"{split}.csv"
    if jsonl.is_file():
        path, rows = jsonl, read_jsonl_numbered(jsonl)
    elif csv_path.is_file():
        path = csv_path
        with csv_path.open(encoding="utf-8", newline="") as f:
            rows = list(enumerate(csv.DictReader(f), start=2))
    else:
        raise UserError(f"data file not found: {jsonl} (or {csv_path.name})")
    return examples_from_rows(task, rows, path)


def examples_from_rows(task: Task, rows: list[tuple[int, dict]], path: Path) -> Examples:
    """Validated ``Examples`` from (line number, row) pairs of ``path``; an error if empty."""
    texts, labels = [], []
    for lineno, row in rows:
        text, label = validate_row(task, row, f"{path}:{lineno}")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise UserError(f"{path}: no examples")
    return Examples(texts, labels, str(path))


def validate_row(task: Task, row: dict, where: str) -> tuple[str, int]:
    if "text" not in row or "label" not in row:
        raise UserError(f"{where}: expected fields 'text' and 'label'")
    text, label = row["text"], row["label"]
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: empty text")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise UserError(f"{where}: label {label!r} is not an integer") from None
    if not 0 <= label < task.num_classes:
        raise UserError(
            f"{where}: label {label} outside the task's {task.num_classes} classes "
            f"({', '.join(task.label_names)})"
        )
    return text, label


def _load_hub(task: Task, split: str) -> Examples:
    import datasets  # imported lazily: slow, and only needed for hub data

    assert task.hub is not None
    hub_split = task.hub.splits.get(split, split)
    try:
        ds = datasets.load_dataset(task.hub.path, task.hub.name, split=hub_split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure is a user-facing error
        # the library's own words say what went wrong (offline, no such split, gated, ...)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(
            f"could not load {task.hub.path} split {hub_split!r} from the Hugging Face hub: "
            f"{reason}; pass --data-dir for local files"
        ) from None
    source = f"hf://{task.hub.path}/{hub_split}"
    texts, labels = [], []
    for i, row in enumerate(ds):
        text, label = validate_row(
            task,
            {"text": row[task.hub.text_field], "label": row[task.hub.label_field]},
            f"{source}[{i}]",
        )
        texts.append(text)
        labels.append(label)
    return Examples(texts, labels, source)


DEV_SEED = 20250217  # fixed: the dev slice must not move with any user seed
# The rule of :func:`dev_indices` and :func:`judge_indices`, recorded by experiments: a resumed
# run never mixes dev slices or pools drawn around different held-out rows.
DEV_SLICE_RULE = "blake2b-keyed-rank, judge slice after dev"


def dev_indices(examples: Examples, size: int) -> list[int]:
    """Indices (sorted) of the dev slice of a split: its ``size`` rows (at most half the split)
    whose BLAKE2b digest of (label, text), keyed by :data:`DEV_SEED`, is smallest.

    Whether a row is dev depends on that row and on the rows ranked before it, not on where rows
    sit (positions only break ties between copies of one row, which are interchangeable): while
    the slice has its full size, adding or removing one row moves at most one other row across
    the boundary, so the rows outside the dev slice of neighbouring splits differ by one row, as
    a guarantee for the whole split (Poisson releases, ``docs/privacy.md``) needs."""
    return sorted(_keyed_ranking(examples)[: min(size, len(examples.labels) // 2)])


def judge_indices(examples: Examples, dev_size: int, judge_size: int) -> list[int]:
    """Indices (sorted) of the judge slice: the ``judge_size`` rows ranked next after the dev
    slice (dev and judge together at most half the split). Dev and judge slices together are a
    prefix of one ranking, so the argument of :func:`dev_indices` holds for their union."""
    half = len(examples.labels) // 2
    ranked = _keyed_ranking(examples)
    return sorted(ranked[min(dev_size, half) : min(dev_size + judge_size, half)])


def _keyed_ranking(examples: Examples) -> list[int]:
    """Row indices ordered by their BLAKE2b digest of (label, text), keyed by :data:`DEV_SEED`."""
    key = DEV_SEED.to_bytes(8, "little")
    digests = [
        hashlib.blake2b(f"{y}\0{t}".encode(), key=key, digest_size=16).digest()
        for t, y in zip(examples.texts, examples.labels, strict=True)
    ]
    return sorted(range(len(digests)), key=lambda i: (digests[i], i))
