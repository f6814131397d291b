"""Demo step 5: the key-value memory pipeline, run through the command-line entry points as a user would,
then a printed summary read back from their outputs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from fflayers.assets import smollm2_gguf_path
from fflayers.backends.base import LMAdapter
from fflayers.backends.hf import HFAdapter
from fflayers.memories import read_textual_dir
from fflayers.memories.agreement import agreement_by_layer
from fflayers.memories.ffn_info import ffn_info_by_layer

ANALYSIS = Path(__file__).resolve().parents[2] / "analysis"


def _model_flags(adapter: LMAdapter, model_dir: Path | None) -> list[str]:
    """``--hf_model DIR`` for an HF folder (the demo's dequantised SmolLM2 copy; the GGUF file when none is
    given), ``--model_dir DIR`` for a fairseq model."""
    if isinstance(adapter, HFAdapter):
        if model_dir is not None:
            return ["--hf_model", str(model_dir)]
        gguf = smollm2_gguf_path()
        return ["--hf_model", str(gguf.parent), "--gguf_file", gguf.name]
    return ["--model_dir", str(model_dir)]


def _run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(ANALYSIS / script), *args]
    print("$ " + " ".join(["python", f"analysis/{script}", *args]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run_memories(name: str, adapter: LMAdapter, corpus: Path, out: Path, n_sentences: int,
                 model_dir: Path | None = None, k: int = 20, info_sentences: int = 100,
                 agreement_layers: list[int] | None = None) -> None:
    """Trigger examples -> textual files -> key-value agreement (+ random baseline) -> layer-mode info ->
    figures.

    ``agreement_layers`` limits the agreement step (every value through the full vocabulary, twice with the
    baseline) to some layers, to keep the demo short on a CPU; the command-line tools default to all layers.
    """
    out.mkdir(parents=True, exist_ok=True)
    flags = _model_flags(adapter, model_dir)
    jsonl, textual, base = out / "trigger_examples.jsonl", out / "trigger_examples", out / "agreement"
    layer_info, figures = out / "ffn_info_layer.parquet", out / "figures"
    print(f"\n--- {name}: {n_sentences} sentences, top-{k} trigger examples for all "
          f"{adapter.n_layers} x {adapter.d_ff} keys", flush=True)
    if not jsonl.is_file():
        _run("generate_outputs.py", "--data_file", str(corpus), *flags, "--get_trigger_examples",
             "--extract_mode", "layer-raw", "--top_k_trigger_examples", str(k), "--max_sentences",
             str(n_sentences), "--output_file", str(jsonl), "--quiet")
    if not (textual / "textual.json").is_file():  # the completion marker of a finished conversion
        _run("trigger_examples_jsonl_to_textual.py", "--input_file", str(jsonl), *flags, "--output_dir",
             str(textual), "--overwrite", "--quiet")
    if not Path(f"{base}.tsv").is_file():
        layer_flags = ["--layers", *map(str, agreement_layers)] if agreement_layers else []
        _run("key_value_agreement.py", *flags, "--data_dir", str(textual), "--output_base", str(base),
             *layer_flags, "--random_baseline", "--quiet")
    if not layer_info.is_file():
        _run("generate_outputs.py", "--data_file", str(corpus), *flags, "--extract_ffn_info",
             "--extract_mode", "layer", "--max_sentences", str(info_sentences), "--output_file",
             str(layer_info), "--quiet")
    _run("plot_memories.py", "--agreement_tsv", f"{base}.tsv", "--baseline_tsv", f"{base}_random.tsv",
         "--ffn_info", str(layer_info), "--output_dir", str(figures))
    summarize(name, adapter, textual, base, layer_info)


def summarize(name: str, adapter: LMAdapter, textual: Path, base: Path, layer_info: Path,
              n_keys: int = 5) -> None:
    """Per-layer agreement vs the random baseline and memory statistics, then a few keys with their triggers
    and value tokens."""
    table = pd.read_csv(f"{base}.tsv", sep="\t")
    agree = agreement_by_layer(table).set_index("layer")
    chance = agreement_by_layer(pd.read_csv(f"{base}_random.tsv", sep="\t")).set_index("layer")
    info = ffn_info_by_layer(pd.read_parquet(layer_info), adapter.d_ff).set_index("layer")
    print(f"\n{name}, per layer: agreement rate (value top-1 = top trigger's next token) vs random values; "
          "share of active memories; layer top-1 = some memory's top-1; = residual's top-1")
    print("  layer  agreement  random  active  memory  residual")
    for layer, row in agree.iterrows():
        inf = info.loc[layer] if layer in info.index else None
        extra = (f"{inf.active_share:6.1%}  {inf.matches_memory:6.1%}  {inf.matches_residual:8.1%}"
                 if inf is not None else "")
        print(f"  {layer:5d}  {row.agreement_rate:9.2%}  {chance.loc[layer].agreement_rate:6.2%}  {extra}")

    examples = read_textual_dir(textual)
    confident = table[table["embedding_token_target_count"] > 0].sort_values("max_prob", ascending=False)
    if len(confident) < n_keys:
        confident = pd.concat([confident, table.sort_values("max_prob", ascending=False)]).drop_duplicates(
            ["layer", "W2_dim"])
    print(f"\n{name}: {n_keys} keys, their top trigger prefixes (*next token*) and their value's top tokens")
    for row in confident.head(n_keys).itertuples():
        layer, dim = int(row.layer), int(row.W2_dim)
        with torch.inference_mode():
            top = adapter.project(adapter.ffn_values(layer)[dim][None])[0].topk(5)
        tokens = [t.strip() or repr(t) for t in adapter.vocab.id_to_token(top.indices.tolist())]
        print(f"  key {dim} of layer {layer}: value -> {' | '.join(tokens)} (p={top.values[0].exp():.2f})")
        for value, prefix, target in examples.get((layer, dim), [])[:3]:
            print(f"      {value:6.2f}  ...{prefix[-70:]} *{target}*")
