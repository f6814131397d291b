"""Adapters of the contract suite (test_contract.py).

``adapter``: every architecture of the HF table as a tiny random model (norms and biases perturbed so that
the checks see them), and the three trained fairseq LMs. ``text_adapter``: backends with real tokenizers
(GPT-2 byte-level BPE from the real GPT-2 files, a Llama-style Metaspace BPE with BOS, a BERT WordPiece
with [CLS]/[SEP]/[MASK]) and the fairseq LMs' dictionaries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.backends.hf_arch import ARCHITECTURES
from tests.fixtures.hf_models import FF, HEADS, HF_ARCHS, LAYERS, POS, VOCAB, D, tiny_config, tiny_model

FAIRSEQ = ("fairseq_plain_lm", "fairseq_adaptive_lm", "fairseq_prenorm_lm")
HF_TEXT = ("gpt2_bpe", "llama_metaspace", "bert_wordpiece")
#: the WordPiece vocabulary of ``bert_wordpiece`` (ids in this order)
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "is", "paris",
              "lon", "##don", ",", "!", "hello", "world", "tim", "cook", "ceo", "1", "200", "km", "spaced",
              "words", "here", "##s"]


def extra_config(arch: str):
    """Tiny configs of table architectures that tests/fixtures/hf_models.py does not build."""
    import transformers as tf

    if arch == "mistral":  # grouped-query heads and a sliding window shorter than the test sequences
        return tf.MistralConfig(hidden_size=D, intermediate_size=FF, num_attention_heads=HEADS,
                                num_key_value_heads=2, num_hidden_layers=LAYERS, max_position_embeddings=POS,
                                sliding_window=8, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                                pad_token_id=0)
    sizes = dict(hidden_size=D, intermediate_size=FF, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                 max_position_embeddings=POS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0)
    if arch == "qwen2":  # q/k/v biases, grouped-query heads
        return tf.Qwen2Config(num_key_value_heads=2, **sizes)
    if arch == "qwen3":  # q/k norms, an explicit head size
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=D // HEADS, **sizes)
    if arch == "olmo":  # non-parametric LayerNorm, clipped q/k/v
        return tf.OlmoConfig(clip_qkv=4.0, **sizes)
    if arch == "smollm3":  # every other layer without rotary positions
        return tf.SmolLM3Config(num_key_value_heads=2, no_rope_layer_interval=2, **sizes)
    if arch == "stablelm":  # parallel attention and MLP, partial rotary, q/k LayerNorms
        return tf.StableLmConfig(use_parallel_residual=True, partial_rotary_factor=0.5, qk_layernorm=True,
                                 use_qkv_bias=True, num_key_value_heads=2, **sizes)
    if arch == "starcoder2":  # plain MLP with biases, LayerNorm, sliding window
        return tf.Starcoder2Config(num_key_value_heads=2, sliding_window=8, residual_dropout=0.0,
                                   embedding_dropout=0.0, **sizes)
    if arch == "gemma":  # embeddings scaled by sqrt(d), (1 + w) RMSNorm, gated tanh-GELU MLP, head size given
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=D // HEADS, **sizes)
    if arch == "gemma2":  # norms after the sublayers, soft-capped scores and logits, sliding layers 0 and 2
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=D // HEADS, query_pre_attn_scalar=16,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=4,
                               **sizes)
    if arch == "olmo2":  # norms after the sublayers only, q/k norms over all heads at once
        return tf.Olmo2Config(num_key_value_heads=2, **sizes)
    if arch == "cohere":  # a parallel block with one bias-free LayerNorm, interleaved rotary, scaled logits
        return tf.CohereConfig(num_key_value_heads=2, logit_scale=0.5, **sizes)
    if arch == "gemma3_text":  # Gemma 2's block, per-head q/k norms, a rotary base per layer type
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=D // HEADS, query_pre_attn_scalar=16,
                                   sliding_window=4, final_logit_softcapping=3.0,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   **sizes)
    if arch == "phi":  # parallel attention and MLP after one shared LayerNorm, partial rotary, head bias
        return tf.PhiConfig(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, **sizes)
    if arch == "phi3":  # fused q | k | v (grouped-query heads) and fused gate | up projections
        return tf.Phi3Config(num_key_value_heads=2, **sizes)
    if arch == "gpt_bigcode":  # GPT-2's block, nn.Linear projections, multi-query fused c_attn
        return tf.GPTBigCodeConfig(n_embd=D, n_inner=FF, n_head=HEADS, n_layer=LAYERS, n_positions=POS,
                                   multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "distilbert":  # post-norm blocks, its MLM head computed inline
        return tf.DistilBertConfig(dim=D, hidden_dim=FF, n_heads=HEADS, n_layers=LAYERS,
                                   max_position_embeddings=POS, vocab_size=VOCAB, pad_token_id=0, dropout=0.0,
                                   attention_dropout=0.0)
    if arch in ("roberta", "xlm-roberta"):  # BERT's blocks, positions offset past the padding id, lm_head
        cls = tf.RobertaConfig if arch == "roberta" else tf.XLMRobertaConfig
        return cls(hidden_size=D, intermediate_size=FF, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                   max_position_embeddings=POS + 2, vocab_size=VOCAB, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return None


def perturbed(model: torch.nn.Module, norms: bool = False, seed: int = 11) -> torch.nn.Module:
    """Random init leaves biases at zero and norms at the identity: perturb biases (and norm weights where
    ``tiny_model`` did not already), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (norms and ("norm" in name.lower() or "ln" in name.lower())):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(arch: str) -> torch.nn.Module:
    """A tiny random model of a table architecture, fp32, eval mode."""
    import transformers as tf

    if arch in HF_ARCHS:
        return perturbed(tiny_model(arch))
    cfg = extra_config(arch)
    if cfg is None:
        pytest.fail(f"architecture {arch!r} of the HF table has no tiny config: add one to "
                    "tests/fixtures/hf_models.py (or extra_config in tests/backends/conftest.py)")
    torch.manual_seed(0)
    auto = tf.AutoModelForMaskedLM if ARCHITECTURES[arch].masked_lm else tf.AutoModelForCausalLM
    return perturbed(auto.from_config(cfg), norms=True)


@pytest.fixture(params=[*ARCHITECTURES, *FAIRSEQ])
def adapter(request):
    """One adapter per HF architecture of the table (fresh tiny model) and per trained fairseq LM (loaded
    once per module: tests that edit it restore it)."""
    if request.param in FAIRSEQ:
        return request.getfixturevalue("fairseq_adapters")(request.param)
    return HFAdapter(hf_model(request.param), device="cpu")


def bert_wordpiece_tokenizer(folder: Path):
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n", encoding="utf-8")
    return tf.BertTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def hf_text_adapters(tiny_gpt2_dir, tmp_path_factory):
    """``get(name)``: an HF adapter with a real fast tokenizer, built once per session."""
    import transformers as tf

    from tests.backends.test_offsets import sentencepiece_style_tokenizer

    cache: dict[str, HFAdapter] = {}

    def build(name: str) -> HFAdapter:
        if name == "gpt2_bpe":
            return HFAdapter(tf.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                             tf.GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir), device="cpu")
        if name == "llama_metaspace":
            tok = sentencepiece_style_tokenizer()
            cfg = tiny_config("llama")
            cfg.vocab_size = len(tok)
            return HFAdapter(tf.LlamaForCausalLM(cfg).eval(), tok, device="cpu")
        tok = bert_wordpiece_tokenizer(tmp_path_factory.mktemp("bert_wordpiece"))
        cfg = tiny_config("bert")
        cfg.vocab_size = len(tok)
        return HFAdapter(tf.BertForMaskedLM(cfg).eval(), tok, device="cpu")

    def get(name: str) -> HFAdapter:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(params=[*HF_TEXT, *FAIRSEQ])
def text_adapter(request):
    """Adapters whose vocabulary tokenizes text: HF with real fast tokenizers, and the fairseq LMs."""
    if request.param in FAIRSEQ:
        return request.getfixturevalue("fairseq_adapters")(request.param)
    return request.getfixturevalue("hf_text_adapters")(request.param)
