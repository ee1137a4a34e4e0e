"""Write tiny random-weight HF checkpoints (config + safetensors + a locally trained tokenizer) to a directory.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small synthetic corpus, with Qwen's chat
special tokens and a ChatML chat template, so `transformers`, vLLM and the Megatron provider all load the same
directory. head_dim is >= 32 because vLLM's CPU attention rejects smaller heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = namespace(v='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}"
    "{% elif part['type'] == 'image' %}{% set text.v = text.v + '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{% endif %}{% endfor %}{% set text = text.v %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


@dataclass
class TinyQwen2Spec:
    """Shape of a tiny Qwen2 model; defaults keep fwd+bwd in milliseconds on CPU."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    vocab_size: int = 0
    """0 = the tokenizer's size."""
    seed: int = 0


def _corpus() -> list:
    words = ("what is the answer put final in boxed solve check whether this correct incorrect yes no image "
             "question response step think plus minus times equals so result therefore first second compare "
             "which of two answers a b is are true false reason").split()
    lines = [" ".join(words[i:i + 7]) for i in range(0, len(words), 3)]
    lines += [f"What is {a} + {b}? {a} + {b} = {a + b}. \\boxed{{{a + b}}}" for a in range(10) for b in range(10)]
    lines += [f"What is {a} - {b}? \\boxed{{{a - b}}} (A) (B) Yes No" for a in range(10) for b in range(10)]
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE on a synthetic corpus and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def write_tiny_qwen2(out_dir, spec: TinyQwen2Spec | None = None) -> Path:
    """Write a random-weight Qwen2ForCausalLM checkpoint with its tokenizer; returns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = spec or TinyQwen2Spec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = Qwen2Config(
        vocab_size=spec.vocab_size or len(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_norm_eps, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF init leaves biases at zero; random biases make the oracle test meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(str(out))
    (out / "spark_tiny.json").write_text(json.dumps(spec.__dict__, indent=1))
    return out
