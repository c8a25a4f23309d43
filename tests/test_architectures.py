"""Every stage on tiny random models of the causal-LM families users bring: Llama, GPT-2,
GPT-NeoX, Phi, Qwen2, Mistral, Gemma and Gemma 3 (whose embedding modules scale their table and
hold a 0-dim buffer), a Gemma 3 with a real 262k vocabulary, tied and untied heads. (Release
targets against autograd on each: tests/test_release.py.)"""

import json

import pytest
import torch
from conftest import ARCHITECTURES, build_model, cli, tiny_run

from gradmm.core.lm import (
    check_logits_are_the_output_layers,
    final_hidden,
    fingerprint,
    output_layer,
)
from gradmm.errors import UserError
from gradmm.models.loading import load_model
from gradmm.stages.configs import GenerateConfig
from gradmm.stages.generate import build_solver
from gradmm.stages.record import load_release, load_release_model


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_release_generate_filter_on_every_architecture(kind, model_dirs, data_dir, tmp_path):
    rel, run = tiny_run(tmp_path, model_dirs[kind], data_dir)
    r = cli("filter", run, "--no-classifier")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["text"] for r in rows)

    # inputs_embeds built from the solver's embedding rows are what input_ids give the model
    release = load_release(rel)
    lm = load_release_model(release)
    solver, problems, _ = build_solver(
        lm, release, GenerateConfig(**{"per_class": 2, "batch": 2, "length": 5})
    )
    free = torch.randint(
        0, len(lm.tokenizer), (len(problems), 2, 5), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        via_embeds = solver.rec(solver.embed(free, problems), problems)
        ids = solver.layout.full_ids(free, problems.classes).flatten(0, 1)
        h = final_hidden(lm.model, input_ids=ids)[:, -1:].reshape(len(problems), 2, 1, -1)
        via_ids = solver.loss(h, problems.classes)
    torch.testing.assert_close(via_embeds, via_ids, rtol=1e-4, atol=1e-5)


def test_fingerprint_covers_zero_dim_buffers(model_dirs):
    lm = load_model(str(model_dirs["gemma3"]))
    zero_dim = [n for n, b in lm.model.named_buffers() if b.dim() == 0]
    assert zero_dim  # Gemma 3's embed_scale
    before = fingerprint(lm.model)
    buffer = dict(lm.model.named_buffers())[zero_dim[0]]
    buffer.mul_(2)
    assert fingerprint(lm.model) != before


def test_soft_capped_logits_are_a_clear_error(tokenizer, data_dir, tmp_path):
    folder = tmp_path / "gemma2"
    build_model("gemma2", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    r = cli(
        "release",
        "--task",
        "sst2",
        "--model",
        folder,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "rel",
    )
    assert r.exit_code == 2 and "final_logit_softcapping" in r.stderr
    assert "Traceback" not in r.output


def test_a_scaled_head_is_a_clear_error(tokenizer):
    """Logits other than W h + b are refused: by name (Granite's logits_scaling) and, for any
    other scaling, by comparing the model's own logits with the output layer's on a probe."""
    from transformers import GraniteConfig, GraniteForCausalLM

    granite = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            logits_scaling=8.0,
        )
    ).eval()
    with pytest.raises(UserError, match="logits_scaling"):
        output_layer(granite)
    llama = build_model("llama", len(tokenizer))
    check_logits_are_the_output_layers(llama, output_layer(llama))  # its logits are W h
    llama.lm_head.register_forward_hook(lambda module, args, out: out / 8)
    with pytest.raises(UserError, match="not W h \\+ b"):
        check_logits_are_the_output_layers(llama, output_layer(llama))
