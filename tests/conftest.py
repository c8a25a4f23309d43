"""Tiny offline fixtures: a BPE tokenizer trained here, random models built from configs, and
data folders laid out like shared/data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

POSITIVE = "great good fine wonderful moving funny lovely brilliant".split()
NEGATIVE = "bad awful dull boring poor weak tedious bland".split()
NOUNS = "movie film story plot cast acting script ending director music".split()
EMOTIONS = {
    "anger": "angry furious mad rage".split(),
    "joy": "happy glad delighted cheerful".split(),
    "optimism": "hopeful bright positive ahead".split(),
    "sadness": "sad lonely crying gloomy".split(),
}


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(
        [rng.choice(["the", "this", "a", "that"]), rng.choice(NOUNS), rng.choice(["is", "was"])]
        + [rng.choice(words) for _ in range(rng.randint(1, 4))]
    )


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [sentence(rng, POSITIVE + NEGATIVE) + " It was great" for _ in range(400)]
    lines += [sentence(rng, NEGATIVE) + " It was bad" for _ in range(400)]
    for name, words in EMOTIONS.items():
        lines += [
            sentence(rng, words) + f" The emotion of this tweet is {name}" for _ in range(200)
        ]
    lines += ["The I The I a an and of to in"] * 50
    return lines


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=600, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_model(kind: str, vocab: int, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "llama":  # untied, no bias
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **common,
        )
        return LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":  # tied
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
        return GPT2LMHeadModel(cfg).eval()
    if kind == "phi":  # untied, output bias
        cfg = PhiConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            **common,
        )
        return PhiForCausalLM(cfg).eval()
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    if kind == "gpt_neox":  # untied, parallel residual, partial rotary
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(**small, rotary_pct=0.5, **common)).eval()
    if kind == "qwen2":  # tied, grouped-query attention with q/k/v biases
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**small, num_key_value_heads=1, tie_word_embeddings=True, **common)
        return Qwen2ForCausalLM(cfg).eval()
    if kind == "mistral":  # untied, sliding window
        from transformers import MistralConfig, MistralForCausalLM

        cfg = MistralConfig(**small, num_key_value_heads=1, sliding_window=16, **common)
        return MistralForCausalLM(cfg).eval()
    if kind == "gemma":  # tied; the model scales inputs_embeds by sqrt(d) itself
        from transformers import GemmaConfig, GemmaForCausalLM

        cfg = GemmaConfig(**small, num_key_value_heads=1, head_dim=16, **common)
        return GemmaForCausalLM(cfg).eval()
    if kind in ("gemma3", "gemma3-256k"):  # the embedding module scales (0-dim buffer)
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        if kind == "gemma3-256k":  # a real Gemma vocabulary: nothing V x d per example
            common = {**common, "vocab_size": 262_144}
        cfg = Gemma3TextConfig(
            **small, num_key_value_heads=1, head_dim=16, sliding_window=16, **common
        )
        return Gemma3ForCausalLM(cfg).eval()
    if kind == "gemma2":  # logits soft-capped: not W h + b
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg = Gemma2Config(**small, num_key_value_heads=1, head_dim=16, **common)
        return Gemma2ForCausalLM(cfg).eval()
    raise ValueError(kind)


ARCHITECTURES = (
    "llama",
    "gpt2",
    "phi",
    "gpt_neox",
    "qwen2",
    "mistral",
    "gemma",
    "gemma3",
    "gemma3-256k",
)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Saved tiny models (with the test tokenizer) by kind (:data:`ARCHITECTURES`)."""
    dirs = {}
    for kind in ARCHITECTURES:
        path = tmp_path_factory.mktemp(f"model-{kind}")
        build_model(kind, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[kind] = path
    return dirs


def write_split(folder: Path, split: str, rows: list[tuple[str, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{split}.jsonl").open("w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}) + "\n")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data root laid out like shared/data with sst2 (2 classes) and tweet_eval_emotion (4)."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    for split, n in (("train", 40), ("validation", 20)):
        rows = [(sentence(rng, NEGATIVE), 0) for _ in range(n)]
        rows += [(sentence(rng, POSITIVE), 1) for _ in range(n)]
        write_split(root / "sst2", split, rows)
    (root / "sst2" / "labels.json").write_text('["negative", "positive"]')
    rows = [(sentence(rng, w), i) for i, w in enumerate(EMOTIONS.values()) for _ in range(24)]
    write_split(root / "tweet_eval_emotion", "train", rows)
    (root / "tweet_eval_emotion" / "labels.json").write_text(json.dumps(list(EMOTIONS)))
    return root


def one_line_error(result, *needles) -> None:
    """``result`` is exit status 2 with one ``gradmm: error:`` line holding every needle."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmm: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def release_args(model, data, out, task="sst2", n=4) -> list:
    """Arguments of a `gradmm release` of ``n`` examples per class."""
    return [
        "release",
        "--task",
        task,
        "--model",
        model,
        "--data-dir",
        data,
        "--out",
        out,
        "--n-per-class",
        n,
    ]


def cli(*args):
    """Invoke the gradmm CLI in-process (arguments stringified)."""
    from typer.testing import CliRunner

    from gradmm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_run(
    tmp_path: Path, model, data_dir, n_per_class: int = 3, **generate
) -> tuple[Path, Path]:
    """`gradmm release` (sst2) then a very short `gradmm generate`; returns (release, run)."""
    rel, run = tmp_path / "rel", tmp_path / "run"
    r = cli(
        "release",
        "--task",
        "sst2",
        "--model",
        model,
        "--data-dir",
        data_dir,
        "--out",
        rel,
        "--n-per-class",
        n_per_class,
    )
    assert r.exit_code == 0, r.output
    options = {
        "per_class": 2,
        "batch": 2,
        "length": 5,
        "steps": 1,
        "inner_steps": 1,
        "init_candidates": 2,
        "topk": 10,
        **generate,
    }
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
    r = cli("generate", "--release", rel, "--out", run, *flags, "--quiet")
    assert r.exit_code == 0, r.output
    return rel, run
