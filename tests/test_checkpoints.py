"""Model sources: a GGUF file (written here with the gguf package's writer) is converted once to
a cached folder and loads with the logits of the model it was written from; short names of real
checkpoints give a one-line error that says how to fetch them."""

import json

import numpy as np
import pytest
import torch
from conftest import build_model, cli

from gradmm.errors import UserError
from gradmm.models.checkpoints import KNOWN_MODELS, resolve_model_name
from gradmm.models.loading import load_model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of q/k projections (the rotary halves interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(model, tokenizer, path) -> None:
    """A float32 GGUF file of a Llama model and its byte-level BPE tokenizer, the way llama.cpp's
    converter writes one."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_loads_with_the_logits_of_its_model(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADMM_CACHE_DIR", str(tmp_path / "cache"))
    model = build_model("llama", len(tokenizer), seed=4)
    path = tmp_path / "tiny.gguf"
    write_gguf(model, tokenizer, path)
    lm = load_model(str(path))
    ids = torch.tensor([tokenizer("the film was great It was")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = lm.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (
        lm.tokenizer("the film was great")["input_ids"]
        == tokenizer("the film was great")["input_ids"]
    )
    # converted once: the second load uses the cached folder keyed by the file's sha256
    (folder,) = (tmp_path / "cache" / "gguf").iterdir()
    source = json.loads((folder / "source.json").read_text())
    assert source["gguf_file"] == "tiny.gguf" and len(source["gguf_sha256"]) == 64
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_name(str(path)) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_unfetched_short_name_says_how_to_fetch(tmp_path, monkeypatch, model_dirs, data_dir):
    monkeypatch.setenv("GRADMM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="gradmm model fetch smollm2-135m"):
        resolve_model_name("smollm2-135m")
    r = cli(
        "release",
        "--task",
        "sst2",
        "--model",
        "smollm2-135m",
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "rel",
    )
    assert r.exit_code == 2 and "run `gradmm model fetch smollm2-135m` once" in r.stderr
    r = cli("model", "fetch", "no-such-model")
    assert r.exit_code == 2 and "unknown model 'no-such-model'" in r.stderr
    r = cli("model", "list")
    assert r.exit_code == 0 and "smollm2-135m" in r.stdout and "not fetched" in r.stdout
    assert r.stdout.count("\n") == len(KNOWN_MODELS)
    r = cli(
        "release", "--task", "sst2", "--model", tmp_path / "missing.gguf", "--out", tmp_path / "rel"
    )
    assert r.exit_code == 2 and "GGUF file not found" in r.stderr
