"""The command lines end to end on tiny random models of families added through the architecture table
(gated Qwen3 with q/k norms, parallel StableLM, plain-MLP StarCoder2, Gemma with scaled embeddings, Phi with
one LayerNorm for a parallel block, multi-query GPT-BigCode, Phi-3 with fused gate | up and q | k | v,
Gemma 2 with norms after the sublayers and soft-capped logits, OLMo 2 with norms after the sublayers only,
Cohere's parallel block and scaled logits),
saved with the real GPT-2 tokenizer:
mining checked against plain torch hooks on each family's own key projection, then textual files, key-value
agreement and attention knockout against transformers' own forward."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analysis import dissect_recall as dr
from analysis import generate_outputs as go
from analysis import key_value_agreement as kva
from analysis import trigger_examples_jsonl_to_textual as to_textual
from fflayers.data import read_corpus, shuffled_sentences
from tests.analysis.test_generate_outputs_cli import LINES, brute_force, check_jsonl
from tests.backends.conftest import extra_config

#: family -> block-relative module whose output is ``mlp_key`` (written here, not read from fflayers)
KEY_MODULE = {"qwen3": "mlp.gate_proj", "stablelm": "mlp.gate_proj", "starcoder2": "mlp.c_fc",
              "gemma": "mlp.gate_proj", "phi": "mlp.fc1", "gpt_bigcode": "mlp.c_fc",
              "phi3": "mlp.gate_up_proj",  # Phi-3: the keys are the first d_ff (gate) features of its output
              "gemma2": "mlp.gate_proj", "olmo2": "mlp.gate_proj", "cohere": "mlp.gate_proj",
              "gemma3_text": "mlp.gate_proj"}


@pytest.fixture(scope="module", params=sorted(KEY_MODULE))
def family_dir(request, tmp_path_factory):
    import transformers as tf

    from fflayers.assets import gpt2_tokenizer_dir

    cfg = extra_config(request.param)
    cfg.vocab_size = 50257
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    gpt2_tokenizer_dir(folder)
    tf.GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)  # names its class for AutoTokenizer
    return request.param, folder


def test_mining_textual_agreement_and_knockout(family_dir, tmp_path, capsys):
    import transformers as tf

    name, folder = family_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == name
    d_ff = getattr(model.config, "intermediate_size", None) or model.config.n_inner  # GPT-BigCode: n_inner
    n_layers = model.config.num_hidden_layers

    top = tmp_path / "top.jsonl"
    assert go.main(["--data_file", str(corpus), "--hf_model", str(folder), "--get_trigger_examples",
                    "--extract_mode", "layer-raw", "--top_k_trigger_examples", "3", "--output_file", str(top),
                    "--device", "cpu", "--batch_tokens", "64", "--quiet"]) == 0, capsys.readouterr().err
    sentences = shuffled_sentences(read_corpus(corpus), seed=0xDEAD, pretokenized=False)
    ids = [tok(s)["input_ids"] for s in sentences]
    body = model.base_model  # Llama's paths (model.layers, model.norm) or GPT-2's (transformer.h, .ln_f)
    blocks = body.layers if hasattr(body, "layers") else body.h
    keys = [block.get_submodule(KEY_MODULE[name]) for block in blocks]
    columns = brute_force(lambda seq: model(input_ids=torch.tensor([seq])), ids, keys, range(d_ff))
    check_jsonl(top, columns, sentences, range(d_ff), n_layers, k=3)

    textual = tmp_path / "txt"
    assert to_textual.main(["--input_file", str(top), "--hf_model", str(folder), "--output_dir", str(textual),
                            "--quiet"]) == 0
    assert len(list(textual.glob("*.txt"))) == n_layers * d_ff
    base = tmp_path / "agreement"
    assert kva.main(["--hf_model", str(folder), "--data_dir", str(textual), "--output_base", str(base),
                     "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    table = pd.read_csv(f"{base}.tsv", sep="\t")
    assert len(table) == n_layers * d_ff
    # a value's top token, straight from the model's own weights: down projection row through norm and head
    layer, dim = n_layers - 1, 5
    down = blocks[layer].get_submodule(KEY_MODULE[name].replace("gate_up_proj", "down_proj")
                                       .replace("gate_proj", "down_proj")
                                       .replace("c_fc", "c_proj").replace("fc1", "fc2"))
    norm = {"phi": "final_layernorm", "gpt_bigcode": "ln_f"}.get(name, "norm")
    norm = body.get_submodule(norm)
    with torch.no_grad():
        logits = model.lm_head(norm(down.weight[:, dim]))
    row = table[(table.layer == layer) & (table.W2_dim == dim)].iloc[0]
    assert row.embedding_index == int(logits.argmax())

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"known_id": 0, "subject": "France", "attribute": "Paris",
                                  "prompt": "The capital of France is"}]))
    out = tmp_path / "knockout.csv"
    assert dr.main(["knockout", "--hf_model", str(folder), "--device", "cpu", "--quiet", "--facts",
                    str(facts), "--window", "1", "--sets", "subject", "last", "--output", str(out)]) == 0
    knock = pd.read_csv(out)
    assert len(knock) == n_layers * 2
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([tok("The capital of France is")["input_ids"]]))
                              .logits[0, -1].double(), -1)
    assert knock["p"].to_numpy() == pytest.approx([float(probs.max())] * len(knock), rel=1e-5)
