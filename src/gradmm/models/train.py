"""The project's own small reference LM: a byte-level BPE tokenizer and a Llama from scratch.

No pretrained weights can be downloaded where gradmm is developed, so quality results use this
model. The corpus is public text that no built-in task uses as private, dev or test data: the
IMDB *train* reviews and WikiText-2 valid/test (``shared/data`` layout). Training checkpoints
every ``checkpoint_every`` steps and resumes exactly (the batch of step ``s`` depends only on
``(seed, s)``), logs loss and tokens/s, and writes a Hugging Face folder loadable with plain
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradmm.errors import UserError
from gradmm.files import (
    OutputKind,
    check_output_dir,
    make_output_dir,
    read_jsonl,
    staged_dir,
    write_json,
)
from gradmm.models.checkpoints import HF_MODEL_FILES
from gradmm.models.recipe import LMTrainConfig

EOS = "<|endoftext|>"
# Public corpus files, relative to the data dir. Never a split a built-in task evaluates on.
CORPUS_FILES = ("imdb/train.jsonl", "wikitext2/valid.txt", "wikitext2/test.txt")
# Words that must be single tokens: the built-in templates and verbalizers.
REQUIRED_TOKENS = (" It", " was", " great", " bad", " anger", " joy", " optimism", " sadness")


def _clean_wikitext(line: str) -> str:
    line = line.strip()
    if not line or line.startswith("="):
        return ""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "something")):
        line = line.replace(a, b)
    return re.sub(r" ([.,;:!?)'])", r"\1", line).replace("( ", "(")


def corpus_documents(data_dir: Path) -> tuple[list[str], list[dict]]:
    """The training documents and a manifest of the files they came from (path, sha256, docs)."""
    docs, manifest = [], []
    for rel in CORPUS_FILES:
        path = Path(data_dir) / rel
        if not path.is_file():
            raise UserError(f"corpus file not found: {path}")
        if path.suffix == ".jsonl":
            texts = [r["text"].replace("<br />", " ").strip() for r in read_jsonl(path)]
        else:
            texts = [_clean_wikitext(line) for line in path.read_text(encoding="utf-8").split("\n")]
        texts = [t for t in texts if t]
        docs.extend(texts)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest.append({"path": rel, "sha256": sha, "documents": len(texts)})
    return docs, manifest


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE over ``docs``; fails if a built-in label or template word splits."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS
    )
    missing = [w for w in REQUIRED_TOKENS if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if missing:
        tok.add_tokens(missing)  # rare words (e.g. " optimism") become whole tokens
    return tok


def build_model(config: LMTrainConfig, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of predicting ``ids[:, t+1]`` from ``ids[:, :t+1]`` ((N, L) -> scalar).

    Hugging Face shifts ``labels`` itself, so the same tensor goes in as inputs and labels.
    """
    return model(input_ids=ids, labels=ids).loss


def _batch(tokens: np.ndarray, config: LMTrainConfig, step: int) -> torch.Tensor:
    gen = np.random.default_rng([config.seed, step])
    starts = gen.integers(0, len(tokens) - config.seq_len - 1, size=config.batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + config.seq_len + 1] for s in starts])).long()


def _lr(config: LMTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, seq_len: int, max_windows: int = 200) -> float:
    """Mean next-token loss over consecutive windows of ``tokens``."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    windows = torch.from_numpy(tokens[: n * seq_len + 1].astype(np.int64))
    losses = []
    for i in range(0, n, 16):
        chunk = torch.stack(
            [windows[j * seq_len : (j + 1) * seq_len + 1] for j in range(i, min(n, i + 16))]
        )
        losses.append(float(next_token_loss(model, chunk)))
    return sum(losses) / len(losses)


# The model folder: what save_pretrained writes, plus our training record.
LM_DIR = OutputKind("model", "training.json", (*HF_MODEL_FILES, "training.json"))


LM_WORK_DIR = OutputKind(
    "training work",
    "state.pt",
    ("state.pt", "state.tmp", "tokens.npy", "corpus.json", "tokenizer", "log.jsonl"),
)


def train_lm(config: LMTrainConfig, out: Path, work: Path | None = None) -> Path:
    """Train (or resume) the reference LM; writes the final model folder to ``out``."""
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    # before any work: never write into (or over) someone else's folder
    check_output_dir(out, LM_DIR)
    check_output_dir(work, LM_WORK_DIR)
    make_output_dir(work, LM_WORK_DIR)
    tok, corpus_manifest, ids = _tokenized_corpus(config, work)
    n_heldout = int(len(ids) * config.heldout_fraction)
    train_ids, heldout_ids = ids[:-n_heldout], ids[-n_heldout:]

    model = build_model(config, len(tok))
    # PyTorch's CPU flash-attention backward is slower than eager attention at these sizes.
    model.set_attn_implementation("eager")
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    step, seconds = _train_steps(model, opt, train_ids, config, work)
    model.eval()
    model.set_attn_implementation("sdpa")
    last = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()][-1]
    info = {
        "corpus": corpus_manifest,
        "config": config.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "tokens_seen": step * config.batch_size * config.seq_len,
        "corpus_tokens": int(len(ids)),
        "wall_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "final_train_loss": last["loss"],
        "heldout_loss": heldout_loss(model, heldout_ids, config.seq_len),
    }
    with staged_dir(out, LM_DIR) as tmp:  # a reader never sees half a model folder
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "training.json", info)
    return out


def _tokenized_corpus(config: LMTrainConfig, work: Path) -> tuple:
    """(tokenizer, corpus manifest, token ids with EOS after each document), trained and
    encoded once and kept in ``work``."""
    from transformers import AutoTokenizer

    if (work / "tokenizer" / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(work / "tokenizer")
        return tok, json.loads((work / "corpus.json").read_text()), np.load(work / "tokens.npy")
    docs, corpus_manifest = corpus_documents(Path(config.data_dir))
    tok = train_tokenizer(docs, config.vocab_size)
    encoded = tok(docs, add_special_tokens=False)["input_ids"]
    ids = np.fromiter((t for doc in encoded for t in (*doc, tok.eos_token_id)), dtype=np.uint16)
    np.save(work / "tokens.npy", ids)
    write_json(work / "corpus.json", corpus_manifest)
    tok.save_pretrained(work / "tokenizer")
    return tok, corpus_manifest, ids


def _train_steps(model, opt, train_ids: np.ndarray, config: LMTrainConfig, work: Path) -> tuple:
    """Train to ``config.max_steps`` from the checkpoint in ``work`` (if any): logs to
    ``log.jsonl``, checkpoints to ``state.pt``; returns (steps, training seconds in all)."""
    state_path, log_path = work / "state.pt", work / "log.jsonl"
    step, seconds = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = state["step"], state["seconds"]
        if log_path.exists():  # drop log lines written after the checkpoint we resume from
            kept = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= step]
            log_path.write_text("".join(line + "\n" for line in kept))
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="lm train", unit="step")
    tokens_per_step = config.batch_size * config.seq_len
    started, window_loss, window_steps = time.time(), 0.0, 0
    while step < config.max_steps:
        batch = _batch(train_ids, config, step)
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window_loss, window_steps = window_loss + float(loss.detach()), window_steps + 1
        bar.update(1)
        if step % config.log_every == 0:
            elapsed = seconds + time.time() - started
            rec = {
                "step": step,
                "loss": window_loss / window_steps,
                "lr": _lr(config, step - 1),
                "tokens_seen": step * tokens_per_step,
                "tokens_per_s": step * tokens_per_step / elapsed,
            }
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window_loss, window_steps = 0.0, 0
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
            torch.save(
                {**state, "seconds": seconds + time.time() - started},
                state_path.with_suffix(".tmp"),
            )
            os.replace(state_path.with_suffix(".tmp"), state_path)
    bar.close()
    return step, seconds + time.time() - started
