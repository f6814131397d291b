"""The explorer's computations, without the web: :class:`Explorer` answers every API request as a dict.

One lock serialises the model's use (each request installs its hooks for its own forward passes and removes
them before the next request runs); nothing here edits a weight.

>>> ex = Explorer(adapter)
>>> ex.trace("The capital of France is", target=" Paris")["original"]["prediction"][0]
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import ModelError
from fflayers.explore.interventions import (
    Intervention,
    RequestError,
    applied,
    interventions_json,
    parse_interventions,
    python_snippet,
)
from fflayers.explore.notes import Notes
from fflayers.explore.sources import NoMemories, NoValues, Reading
from fflayers.hooks import capture
from fflayers.runs import model_fingerprint

__all__ = ["Limits", "Explorer", "LogitReading"]

#: the three states of a layer that the trace reads: hook point, state index of the lens
STATES = ("resid_pre", "attn", "mlp")
UNEDITED_CACHE = 32   # unedited traces kept per server


class LogitReading:
    """The logit lens: the model's final norm and head on the state itself."""

    def __init__(self, adapter: LMAdapter) -> None:
        self.adapter = adapter

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The state as it is (so a trace projects every state of every layer in one head call)."""
        return h

    def log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.adapter.project(h).float()


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for."""

    max_prompt_tokens: int = 512
    max_prompt_chars: int = 4000
    max_k: int = 50
    max_interventions: int = 64
    max_new_tokens: int = 64
    max_results: int = 200

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Explorer:
    """Everything the explorer page shows, for one model.

    ``lenses``: more readings of a state than ``logit`` (the model's final norm and head), name -> an object
    with ``log_probs(h, state)`` such as :class:`fflayers.lenses.LinearShortcutLens` (``mat``);
    ``memories``: a :class:`fflayers.memories.index.MemoryIndex` (trigger examples, agreement, knowledge
    neurons); ``values``: a :class:`fflayers.embedding_space.value_index.ValueIndex` (the token search and
    the embedding values are read in); ``notes``: the SQLite store of value names; ``load_code``: the Python
    line that loads this model into ``adapter`` (for exported snippets). :func:`fflayers.explore.build`
    makes all of them from file paths.
    """

    def __init__(self, adapter: LMAdapter, *, lenses: dict[str, Reading] | None = None,
                 memories=None, values=None,
                 notes: Notes | None = None, load_code: str = "adapter = ...  # load the model here",
                 name: str = "model", limits: Limits = Limits()) -> None:
        if adapter.is_masked_lm:
            raise ModelError("the explorer traces next-token predictions; this is a masked LM: load a "
                             "causal LM")
        self.adapter = adapter
        self.name = name
        self.limits = limits
        self.load_code = load_code
        self.lock = threading.RLock()
        self.fingerprint = model_fingerprint(adapter)
        self.lenses: dict[str, Reading] = {"logit": LogitReading(adapter), **(lenses or {})}
        self.memories = memories or NoMemories()
        self.values = values or NoValues(adapter)
        self.notes = notes
        self._unedited: OrderedDict[tuple, dict] = OrderedDict()   # the last unedited runs

    # ----- request checks -----------------------------------------------------------------------------------
    def tokenize(self, prompt: object) -> list[int]:
        """The prompt's ids, or a :class:`RequestError` (empty, too long, not a string)."""
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}", 400)
        if not prompt.strip():
            raise RequestError("the prompt is empty; type some text")
        if len(prompt) > self.limits.max_prompt_chars:
            raise RequestError(f"the prompt has {len(prompt)} characters; at most "
                               f"{self.limits.max_prompt_chars}", 413)
        ids = self.adapter.vocab.tokenize(prompt)
        cap = self.limits.max_prompt_tokens
        if self.adapter.max_positions is not None:
            cap = min(cap, self.adapter.max_positions)
        if len(ids) > cap:
            raise RequestError(f"the prompt is {len(ids)} tokens long; this model and server take at "
                               f"most {cap}", 413)
        return ids

    def check_k(self, k: object, name: str = "k", cap: int | None = None) -> int:
        cap = cap or self.limits.max_k
        if isinstance(k, bool) or not isinstance(k, int):
            raise RequestError(f"'{name}' must be an integer, got {k!r}", 400)
        if not 1 <= k <= cap:
            raise RequestError(f"'{name}' = {k} out of range: 1..{cap}")
        return k

    def position(self, position: object, n_tokens: int) -> int:
        if isinstance(position, bool) or not isinstance(position, int):
            raise RequestError(f"'position' must be an integer, got {position!r}", 400)
        if not -n_tokens <= position < n_tokens:
            raise RequestError(f"position {position} out of range for a prompt of {n_tokens} tokens "
                               f"({-n_tokens}..{n_tokens - 1})")
        return position % n_tokens

    def layer(self, layer: object) -> int:
        L = self.adapter.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise RequestError(f"'layer' must be an integer, got {layer!r}", 400)
        if not 0 <= layer < L:
            raise RequestError(f"layer {layer} out of range: the model has {L} layers (0..{L - 1})")
        return layer

    def dim(self, dim: object) -> int:
        n = self.adapter.d_ff
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise RequestError(f"'dim' must be an integer, got {dim!r}", 400)
        if not 0 <= dim < n:
            raise RequestError(f"value dim {dim} out of range: layers have {n} values (0..{n - 1})")
        return dim

    def token_id(self, token: object) -> int:
        """The id of a token string (one vocabulary entry, or text that tokenizes to one token)."""
        if not isinstance(token, str) or not token:
            raise RequestError(f"a token must be a non-empty string, got {token!r}", 400)
        vocab = self.adapter.vocab
        tid = vocab.token_to_id(token)
        if tid is None:
            ids = vocab.tokenize(token, add_bos=False)
            if len(ids) != 1:
                raise RequestError(f"{token!r} is not one token of the vocabulary (it tokenizes to "
                                   f"{len(ids)} "
                                   "tokens); give a single token, e.g. ' Paris' with its leading space")
            tid = ids[0]
        return int(tid)

    def lens(self, name: object) -> Reading:
        if name not in self.lenses:
            raise RequestError(f"lens {name!r} unknown; this server has {', '.join(self.lenses)}"
                               + ("" if "mat" in self.lenses else " (start it with --shortcuts for mat)"))
        return self.lenses[name]

    def interventions(self, items: object, n_tokens: int) -> list[Intervention]:
        return parse_interventions(items, self.adapter, n_tokens)

    # ----- answers -----------------------------------------------------------------------------------------
    def info(self) -> dict:
        a = self.adapter
        return {"model": self.name, "n_layers": a.n_layers, "d_model": a.d_model, "d_ff": a.d_ff,
                "vocab_size": a.vocab_size, "max_positions": a.max_positions, "block_layout": a.block_layout,
                "lenses": list(self.lenses), "memories": self.memories.has_triggers,
                "agreement": self.memories.has_agreement, "neurons": self.memories.has_neurons,
                "limits": self.limits.to_json()}

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return self.adapter.vocab.id_to_token(list(ids))

    def _top(self, lp: torch.Tensor, k: int) -> list[dict]:
        top = lp.topk(k)
        ids = top.indices.tolist()
        return [{"token": t, "id": i, "prob": p}
                for t, i, p in zip(self._tokens(ids), ids, top.values.exp().tolist(), strict=True)]

    @torch.no_grad()
    def _run(self, ids: list[int], interventions: Sequence[Intervention], position: int, lens: Reading,
             k: int, target: int | None) -> dict:
        """Prediction and per-layer lens readings at ``position`` of one (possibly edited) forward pass."""
        a = self.adapter
        x = torch.tensor([ids], device=a.device)
        with applied(a, interventions, len(ids)), capture(a, ["resid_pre", "attn_out", "resid_post"]) as c:
            lp = a.log_probs(x)[0, position].float()
        target = int(lp.argmax()) if target is None else target
        states: list[tuple[int, str, int, torch.Tensor]] = []   # (layer, reading, state index, vector)
        for layer in range(a.n_layers):
            pre = c["resid_pre", layer][0, position]
            states += [(layer, "resid_pre", layer, pre),
                       (layer, "attn", layer + 1, pre + c["attn_out", layer][0, position]),
                       (layer, "mlp", layer + 1, c["resid_post", layer][0, position])]
        slp = read_states(lens, a, [(state, h) for _, _, state, h in states])
        top = slp.topk(k)
        probs, top_ids = top.values.exp().tolist(), top.indices.tolist()
        seen = sorted({i for row in top_ids for i in row})
        token_of = dict(zip(seen, self._tokens(seen), strict=True))
        ranks = (slp > slp[:, target : target + 1]).sum(-1).tolist()
        target_probs = slp[:, target].exp().tolist()
        layers: list[dict] = []
        for n, (layer, name, _, _) in enumerate(states):
            if name == "resid_pre":
                layers.append({"layer": layer, "target": {}})
            row = layers[-1]
            row[name] = [{"token": token_of[i], "id": i, "prob": p}
                         for i, p in zip(top_ids[n], probs[n], strict=True)]
            row["target"][name] = {"rank": int(ranks[n]), "prob": float(target_probs[n])}
        return {"prediction": self._top(lp, k), "layers": layers, "target_id": target}

    def _original(self, ids: list[int], pos: int, name: str, lens: Reading, k: int, tid: int | None) -> dict:
        """The unedited run (a copy): the page retraces the same prompt under each new intervention, so the
        last ``UNEDITED_CACHE`` of them are kept (the model is never edited but through a request's hooks)."""
        key = (tuple(ids), pos, name, k, tid)
        if key not in self._unedited:
            self._unedited[key] = self._run(ids, [], pos, lens, k, tid)
            while len(self._unedited) > UNEDITED_CACHE:
                self._unedited.popitem(last=False)
        self._unedited.move_to_end(key)
        return copy.deepcopy(self._unedited[key])

    def trace(self, prompt: str, position: int = -1, lens: str = "logit", k: int = 10,
              target: str | None = None, interventions: object = None) -> dict:
        """The trace of ``prompt`` at ``position``, unedited and (with interventions) edited."""
        ids = self.tokenize(prompt)
        pos = self.position(position, len(ids))
        chosen = self.lens(lens)
        k = self.check_k(k)
        tid = None if target in (None, "") else self.token_id(target)
        ivs = self.interventions(interventions, len(ids))
        with self.lock:
            original = self._original(ids, pos, lens, chosen, k, tid)
            tid = original.pop("target_id")
            edited = None
            if ivs:
                edited = self._run(ids, ivs, pos, chosen, k, tid)
                edited.pop("target_id")
        return {"tokens": self._tokens(ids), "position": pos, "lens": lens,
                "target": {"token": self._tokens([tid])[0], "id": tid}, "original": original,
                "edited": edited}

    @torch.no_grad()
    def subupdates(self, prompt: str, layer: int, position: int = -1, target: str | None = None, n: int = 20,
                   k: int = 8, interventions: object = None) -> dict:
        """The values of ``layer`` at ``position``, ranked by ``|m_i| ||v_i||`` and by
        ``m_i v_i . e_target``."""
        a = self.adapter
        ids = self.tokenize(prompt)
        pos = self.position(position, len(ids))
        layer = self.layer(layer)
        n = self.check_k(n, "n", self.limits.max_results)
        k = self.check_k(k)
        tid = None if target in (None, "") else self.token_id(target)
        ivs = self.interventions(interventions, len(ids))
        with self.lock:
            x = torch.tensor([ids], device=a.device)
            with applied(a, ivs, len(ids)), capture(a, "mlp_coef", layers=[layer]) as c:
                lp = a.log_probs(x)[0, pos]
            tid = int(lp.argmax()) if tid is None else tid
            coef = c["mlp_coef", layer][0, pos].float()
            values = a.ffn_values(layer).detach().float()
            norm = values.norm(dim=1)
            e_target = a.output_embeddings()[tid].detach().float().to(values.device)
            contribution = coef * (values @ e_target)
            score = coef.abs() * norm
            by_mag = score.topk(min(n, len(score))).indices.tolist()
            by_target = contribution.topk(min(n, len(score))).indices.tolist()
            dims = sorted(set(by_mag) | set(by_target))
            top_ids = a.project(values[dims]).topk(k).indices.tolist()
        tops = dict(zip(dims, top_ids, strict=True))

        def row(i: int) -> dict:
            return {"dim": i, "coef": float(coef[i]), "norm": float(norm[i]), "score": float(score[i]),
                    "contribution": float(contribution[i]), "top_tokens": self._tokens(tops[i])}

        return {"layer": layer, "position": pos, "target": {"token": self._tokens([tid])[0], "id": tid},
                "by_magnitude": [row(i) for i in by_mag], "by_target": [row(i) for i in by_target]}

    @torch.no_grad()
    def _greedy(self, ids: list[int], ivs: Sequence[Intervention], n_new: int) -> list[int]:
        a = self.adapter
        out = list(ids)
        eos = a.vocab.eos_id
        cap = a.max_positions
        for _ in range(n_new):
            if cap is not None and len(out) >= cap:
                break
            with applied(a, ivs, len(out)):
                nxt = int(a.log_probs(torch.tensor([out], device=a.device))[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
        return out[len(ids):]

    def generate(self, prompt: str, max_new_tokens: int = 10, interventions: object = None) -> dict:
        """Greedy continuations of ``prompt``, unedited and edited."""
        ids = self.tokenize(prompt)
        n_new = self.check_k(max_new_tokens, "max_new_tokens", self.limits.max_new_tokens)
        ivs = self.interventions(interventions, len(ids))
        with self.lock:
            runs = {"original": self._greedy(ids, [], n_new),
                    "edited": self._greedy(ids, ivs, n_new) if ivs else None}
        vocab = self.adapter.vocab
        return {name: None if new is None else {"text": vocab.detokenize(new), "tokens": self._tokens(new)}
                for name, new in runs.items()}

    @torch.no_grad()
    def value(self, layer: int, dim: int, k: int = 10) -> dict:
        """The value page: key and value rows in embedding space, trigger examples, agreement, neurons,
        note."""
        layer, dim, k = self.layer(layer), self.dim(dim), self.check_k(k)
        with self.lock:
            E = self.values.embedding.matrix
            out: dict = {"layer": layer, "dim": dim}
            for side, w in (("key", self.adapter.ffn_keys(layer)), ("value", self.adapter.ffn_values(layer))):
                scores = E.float() @ w[dim].detach().float().to(E.device)
                out[side] = {"top": self._scored(scores.topk(k)), "bottom": self._scored(scores.topk(k,
                                                                                                   largest=False))}
        out["triggers"] = self.memories.triggers(layer, dim)
        out["agreement"] = self.memories.agreement(layer, dim)
        out["neurons"] = self.memories.neuron_facts(layer, dim)
        out["note"] = None if self.notes is None else self.notes.get(self.fingerprint, layer, dim)
        return out

    def _scored(self, top) -> list[dict]:
        ids = top.indices.tolist()
        return [{"token": t, "id": i, "score": s}
                for t, i, s in zip(self._tokens(ids), ids, top.values.tolist(), strict=True)]

    def save_note(self, layer: int, dim: int, name: object, note: object) -> dict:
        if self.notes is None:
            raise RequestError("this server keeps no notes (started without a notes file)", 404)
        layer, dim = self.layer(layer), self.dim(dim)
        for field, v in (("name", name), ("note", note)):
            if not isinstance(v, str) or len(v) > 10_000:
                raise RequestError(f"'{field}' must be a string of at most 10000 characters", 400)
        self.notes.put(self.fingerprint, layer, dim, name, note)
        return {"ok": True, "note": self.notes.get(self.fingerprint, layer, dim)}

    def search(self, token: str, limit: int = 50) -> dict:
        tid = self.token_id(token)
        limit = self.check_k(limit, "limit", self.limits.max_results)
        with self.lock:
            results = self.values.search(tid, limit)
        return {"token": self._tokens([tid])[0], "id": tid, "results": results}

    def search_keys(self, text: object, limit: int = 50) -> dict:
        if not isinstance(text, str) or not text.strip():
            raise RequestError("'text' must be a non-empty string", 400)
        if not self.memories.has_triggers:
            raise RequestError("this server has no trigger examples; start it with --memories DIR", 404)
        limit = self.check_k(limit, "limit", self.limits.max_results)
        return {"text": text, "results": self.memories.search(text, limit)}

    def export(self, prompt: str, interventions: object = None) -> dict:
        ids = self.tokenize(prompt)
        ivs = self.interventions(interventions, len(ids))
        return {"json": {"prompt": prompt, "interventions": [iv.to_json() for iv in ivs]},
                "python": python_snippet(prompt, ivs, self.load_code), "text": interventions_json(ivs)}


def read_states(lens: Reading, adapter: LMAdapter,
                states: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Log-probabilities ``[N, V]`` of ``N`` (state index, vector) pairs through ``lens``: one lens call per
    state index and, for a lens that maps states to the last layer (``transform``), one head projection of
    them all."""
    groups: dict[int, list[int]] = {}
    for n, (state, _) in enumerate(states):
        groups.setdefault(state, []).append(n)
    order = [n for rows in groups.values() for n in rows]
    stacked = {state: torch.stack([states[n][1].float() for n in rows]) for state, rows in groups.items()}
    transform = getattr(lens, "transform", None)
    if callable(transform):
        out = adapter.project(torch.cat([transform(h, state) for state, h in stacked.items()])).float()
    else:
        out = torch.cat([lens.log_probs(h, state).float() for state, h in stacked.items()])
    result = torch.empty_like(out)
    result[torch.tensor(order, device=out.device)] = out
    return result
