"""Loading a fairseq transformer LM from a model dir (``dict.txt`` + checkpoint) into a
:class:`~fflayers.backends.fairseq_lm.FairseqLMAdapter`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fflayers.backends.checkpoints import load_checkpoint, upgrade_checkpoint
from fflayers.backends.fairseq_lm import FairseqLMAdapter
from fflayers.core import ModelError, require_fairseq

__all__ = ["find_checkpoint", "load_fairseq_lm"]


def find_checkpoint(model_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file of a model dir: ``checkpoint`` if given (name in the dir or a path), else
    ``model.pt``, else ``checkpoint_best.pt``, else ``checkpoint_last.pt``, else the only
    ``checkpoint*.pt``."""
    model_dir = Path(model_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path if path.is_absolute() or path.exists() else model_dir / checkpoint
        if not path.is_file():
            raise ModelError(f"checkpoint {path} does not exist; "
                               f"pass a file name inside {model_dir} or a path")
        return path
    for name in ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (model_dir / name).is_file():
            return model_dir / name
    found = sorted(model_dir.glob("checkpoint*.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(f"no checkpoint in {model_dir}: expected model.pt or checkpoint_*.pt")
    names = ", ".join(p.name for p in found[:5])
    raise ModelError(f"several checkpoints in {model_dir} ({names}); pass checkpoint= to choose one")


def load_dictionary(dict_path: str | Path):
    """fairseq's ``Dictionary`` of ``dict_path``; a malformed file is a one-line :class:`ModelError`."""
    require_fairseq()
    from fairseq.data import Dictionary

    try:
        return Dictionary.load(str(dict_path))
    except (ValueError, RuntimeError, UnicodeDecodeError, IndexError) as e:
        first = " ".join(str(e).split())[:150]
        raise ModelError(f"{dict_path} is not a fairseq dictionary ({first}); each line must be "
                         "'<token> <count>': use the dict.txt that came with the checkpoint") from None


def _build_model(state: dict, dict_path: Path):
    """Build fairseq's task + model from an upgraded checkpoint state and load the weights strictly."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, build_model
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from omegaconf import open_dict

    cfg = state["cfg"]
    model_cfg = cfg.get("model") if "model" in cfg else None
    arch = None
    if model_cfg is not None:
        arch = getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None)
    if arch is None or ARCH_MODEL_NAME_REGISTRY.get(arch, arch) != "transformer_lm":
        raise ModelError(f"checkpoint model is {arch!r}, not a fairseq transformer LM (transformer_lm*); "
                           "use a language-model checkpoint")
    with open_dict(cfg):
        cfg.task.data = str(dict_path.parent)
        for flag in ("checkpoint_activations", "offload_activations"):
            if getattr(cfg.model, flag, False):
                setattr(cfg.model, flag, False)
    dictionary = load_dictionary(dict_path)
    output_size = getattr(cfg.task, "output_dictionary_size", -1)
    if output_size is not None and output_size >= 0:
        raise ModelError("checkpoints trained with --output-dictionary-size are not supported; "
                           "retrain without it")
    task = LanguageModelingTask(cfg.task, dictionary, dictionary)
    try:
        model = build_model(cfg.model, task)
    except Exception as e:  # fairseq raises assorted errors for configs it cannot build
        if "cutoff larger than vocab size" in str(e):
            raise ModelError(f"{dict_path} has {len(dictionary)} symbols, fewer than the checkpoint's "
                             "adaptive cutoffs need; the dictionary and the checkpoint do not match: "
                             "use the dict.txt that came with the checkpoint") from None
        raise ModelError("fairseq could not build the model from the checkpoint's config: "
                           f"{type(e).__name__}: {str(e)[:150]}") from None
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:200]
        raise ModelError(
            f"checkpoint weights do not fit the model built from its config (wrong dict.txt?): {first}"
        ) from None
    return model, dictionary


def load_fairseq_lm(
    model_dir: str | Path,
    checkpoint: str | None = None,
    device: torch.device | str | None = None,
    trust_checkpoint: bool = False,
    raw_text: bool = False,
) -> FairseqLMAdapter:
    """Load a fairseq transformer LM from a model dir (``dict.txt`` + ``model.pt`` or ``checkpoint_*.pt``).

    ``trust_checkpoint=True`` allows full unpickling (only for files you trust); by default checkpoints are
    read weights-only with an allow-list (:mod:`fflayers.backends.checkpoints`). ``raw_text=True`` makes
    :meth:`FairseqLMAdapter.tokenize` Moses-tokenize its input.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model dir {model_dir} does not exist; "
                           "pass a folder holding dict.txt and model.pt")
    dict_path = model_dir / "dict.txt"
    if not dict_path.is_file():
        raise ModelError(f"{model_dir} has no dict.txt; "
                           "put the dictionary the model was trained with next to its checkpoint")
    require_fairseq()
    path = find_checkpoint(model_dir, checkpoint)
    state = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = upgrade_checkpoint(state)
        model, dictionary = _build_model(state, dict_path)
    return FairseqLMAdapter(model, dictionary, device=device, raw_text=raw_text)
