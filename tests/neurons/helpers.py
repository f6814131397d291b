"""Test helpers for knowledge neurons: a tiny BERT tokenizer and an independent integrated-gradients loop.

The reference loop uses only torch and the models' own modules (plain forward hooks, the model's own logits):
no fflayers code.
"""

from __future__ import annotations

from pathlib import Path

import torch

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "is", "paris",
              "lon", "##don", "city", "germany", "berlin", "."]

#: arch -> (blocks path, module whose output is the pre-activation, module whose input is the coefficient)
FFN_MODULES = {
    "gpt2": ("transformer.h", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neo": ("transformer.h", "mlp.c_fc", "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp.fc_in", "mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "llama": ("model.layers", "mlp.gate_proj", "mlp.down_proj"),
    "bert": ("bert.encoder.layer", "intermediate.dense", "output.dense"),
    "fairseq": ("decoder.layers", "fc1", "fc2"),
}


def bert_tokenizer(folder: Path):
    """A BertTokenizer over :data:`BERT_WORDS` (lowercasing, wordpieces ``lon ##don``)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(folder))


def hf_log_probs(model):
    return lambda ids: torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def fairseq_log_probs(model):
    """fairseq's own log-probs; an adaptive softmax is computed out of place here (fairseq's ``get_log_prob``
    writes in place, which autograd cannot differentiate)."""
    asm = model.decoder.adaptive_softmax
    if asm is None:
        return lambda ids: model.get_normalized_probs(model(ids), log_probs=True).float()

    def adaptive(ids):
        x = model(ids)[0]  # features: the decoder leaves the output layer to the adaptive softmax
        flat = x.reshape(-1, x.shape[-1])
        head = torch.log_softmax(asm.head(flat), dim=-1)
        c0 = asm.cutoff[0]
        tails = [torch.log_softmax(t(flat), dim=-1) + head[:, c0 + i, None] for i, t in enumerate(asm.tail)]
        return torch.cat([head[:, :c0], *tails], dim=-1).float().reshape(*x.shape[:-1], -1)

    return adaptive


def ffn_module(model, arch: str, layer: int, point: str) -> torch.nn.Module:
    blocks, key, coef = FFN_MODULES[arch]
    return model.get_submodule(blocks)[layer].get_submodule(key if point == "mlp_key" else coef)


class PatchAt:
    """Read (``value=None``) or replace the activation at ``(batch 0, pos)`` of a module's output
    (``mlp_key``) or first input (``mlp_coef``); ``time_first`` for fairseq's ``[T, B, C]`` tensors."""

    def __init__(self, module, point: str, pos: int, time_first: bool, value: torch.Tensor | None = None):
        self.module, self.point, self.pos, self.tf, self.value = module, point, pos, time_first, value
        self.seen = None

    def _edit(self, x: torch.Tensor) -> torch.Tensor:
        idx = (self.pos, 0) if self.tf else (0, self.pos)
        self.seen = x[idx].detach().clone()
        if self.value is None:
            return x
        y = x.clone()
        y[idx] = self.value.to(y.dtype)
        return y

    def __enter__(self):
        if self.point == "mlp_key":
            self.handle = self.module.register_forward_hook(lambda m, args, out: self._edit(out))
        else:
            self.handle = self.module.register_forward_pre_hook(
                lambda m, args: (self._edit(args[0]), *args[1:]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_ig(model, arch: str, log_probs, ids: torch.Tensor, positions: list[int], targets: list[int],
                 point: str, alphas: list[float], time_first: bool = False) -> torch.Tensor:
    """``[L, d_ff]``: for each layer and target token, ``a * sum_k dP/dx(alpha_k a) / m``, averaged over
    tokens."""
    blocks = model.get_submodule(FFN_MODULES[arch][0])
    out = []
    for layer in range(len(blocks)):
        module = ffn_module(model, arch, layer, point)
        per_token = []
        for pos, tok in zip(positions, targets, strict=True):
            with torch.no_grad(), PatchAt(module, point, pos, time_first) as reader:
                log_probs(ids)
            a = reader.seen.float()
            total = torch.zeros_like(a)
            for alpha in alphas:
                x = (alpha * a).requires_grad_(True)
                with PatchAt(module, point, pos, time_first, value=x):
                    p = log_probs(ids)[0, pos, tok].exp()
                total += torch.autograd.grad(p, x)[0]
            per_token.append(a * total / len(alphas))
        out.append(torch.stack(per_token).mean(0))
    return torch.stack(out)


def paper_alphas(m: int) -> list[float]:
    return [k / m for k in range(1, m + 1)]


def package_alphas(m: int) -> list[float]:
    return [k / (m - 1) for k in range(m)] if m > 1 else [0.0]
