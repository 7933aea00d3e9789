"""Tiny random models and a locally trained tokenizer, for tests, examples and offline demos.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory with the
``tokenizers`` library, and models are built from configs with random weights. Answers from these
models are noise; shapes, code paths and timings are real.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Block attention encodes each retrieved passage on its own and caches its keys and values.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "Title: Rotary embeddings\nRotary position embeddings rotate queries and keys by their position.",
    "Les élèves étudient à l'école; 東京は日本の首都です。 Ünïcödé ✓ — emoji 🚀 included.",
    "You are a helpful assistant. Answer the question using the reference passages below.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<pad>"]


def build_tokenizer(vocab_size: int = 384, bos: bool = True):
    """A byte-level BPE PreTrainedTokenizerFast with BOS/EOS/PAD and a ChatML chat template.

    Args:
        vocab_size: BPE vocabulary size (including the 256 byte tokens and specials).
        bos: whether encoding adds "<s>" at the start (like Llama tokenizers) or not (like Qwen).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _base(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=3,
                eos_token_id=2, pad_token_id=4, tie_word_embeddings=False)


def tiny_config(arch: str, vocab_size: int = 384):
    """Config of a tiny model of the named architecture family.

    Supported names: llama, llama3, yarn, linear, qwen2, qwen3, mistral, gemma, stablelm (partial rotary),
    gpt_neox (partial rotary), phi (partial rotary); refused ones for tests: gpt2, sliding, dynamic,
    longrope, hybrid.
    """
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
        StableLmConfig,
    )

    base = _base(vocab_size)
    if arch == "llama":
        return LlamaConfig(**base)
    if arch == "llama3":
        return LlamaConfig(**base, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 128})
    if arch == "yarn":
        return LlamaConfig(**base, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 256})
    if arch == "linear":
        return LlamaConfig(**base, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if arch == "qwen2":
        return Qwen2Config(**base)
    if arch == "qwen3":
        return Qwen3Config(**base, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**base, sliding_window=None)
    if arch == "gemma":
        return GemmaConfig(**base, head_dim=16)
    if arch == "stablelm":
        return StableLmConfig(**base, partial_rotary_factor=0.25)
    if arch == "phi":
        return PhiConfig(**base, partial_rotary_factor=0.5)
    if arch == "gpt_neox":
        cfg = {k: v for k, v in base.items() if k not in ("num_key_value_heads",)}
        return GPTNeoXConfig(**cfg, rotary_pct=0.25)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    if arch == "sliding":
        return MistralConfig(**base, sliding_window=32)
    if arch == "dynamic":
        return LlamaConfig(**base, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    if arch == "longrope":
        half = 16 // 2  # head_dim 16 -> 8 frequencies
        return Phi3Config(**{**base, "max_position_embeddings": 1024}, original_max_position_embeddings=256,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                                           "original_max_position_embeddings": 256})
    if arch == "hybrid":
        return Qwen2Config(**base, use_sliding_window=True, sliding_window=32, max_window_layers=1)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_model(arch: str, vocab_size: int = 384, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """A tiny randomly initialised causal LM of the named architecture, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # NOTE: default init (std 0.02) gives near-uniform logits; a wider init makes logits and keys
    # large enough that a wrong position or mask shows up clearly in comparisons.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def tiny_pipeline(arch: str = "llama", **kwargs):
    """(model, tokenizer) pair for quick experiments and offline demos."""
    tokenizer = build_tokenizer()
    return tiny_model(arch, vocab_size=len(tokenizer), **kwargs), tokenizer
