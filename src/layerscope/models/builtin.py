"""Built-in small random-weight models of real architectures, with a trained byte-level BPE tokenizer.

They are deterministic functions of (name, seed): the embedded default config uses one so
that the whole workflow runs offline, and the tests build them through the same loading
code as a real checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from layerscope.errors import ModelError

# Shapes of real architectures, scaled down. "llama-512" is the CPU benchmark shape.
SPECS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(arch="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "llama-512": dict(arch="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    "qwen2-tiny": dict(arch="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "gpt2-tiny": dict(arch="gpt2", hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    # OPT: fc1/fc2 sit on the decoder layer itself (no MLP submodule); pre-LN like OPT-125m.
    "opt-tiny": dict(arch="opt", hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    # Mixtral: a sparse mixture-of-experts MLP (4 experts, 2 per token).
    "mixtral-tiny": dict(arch="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512, num_local_experts=4,
                         num_experts_per_tok=2),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# Training text for the tokenizer: enough variety for merges of common English, code and
# a few non-ASCII characters so that multi-byte UTF-8 pieces occur.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A language model predicts the next token.
Interpretability researchers capture activations of the residual stream at every layer.
What is the capital of France? The capital of France is Paris. Which planet is largest?
Tell me about happiness, sadness, calm and excitement. How do neurons respond to emotion?
def forward(self, x):\n    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
Medical advice: drink water, rest, and see a doctor if the fever persists for three days.
Café, naïve, résumé, Zürich, São Paulo, Kraków, 東京, 北京, Москва, Αθήνα, ★ ✓ → ∑ π ≈ 3.14159.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.5 -7 1e-3. Options: (A) (B) (C) (D). Answer: B
I am not sure; it might possibly be true. Why would anyone say that? When did it happen?
Emoji: 🙂 😀 🚀 🧠 — dashes – and “quotes” ‘single’ … ellipsis.
"""


def spec_for(name: str) -> dict[str, Any]:
    """Return the shape of the built-in model ``name`` or raise ModelError naming the choices."""
    if name not in SPECS:
        raise ModelError(f"model.id: unknown built-in model 'builtin:{name}' (choose one of: "
                         + ", ".join(f"builtin:{n}" for n in SPECS) + ")")
    return dict(SPECS[name])


def hf_config_dict(name: str) -> dict[str, Any]:
    """The config.json the built-in model will have (without building it)."""
    s = spec_for(name)
    return _hf_config(s).to_dict()


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "opt": "OPTForCausalLM", "mixtral": "MixtralForCausalLM"}


def config_facts(name: str) -> dict[str, Any]:
    """What planning reads from config.json (depth, widths, positions, architecture), straight from
    the spec: transformers' config classes import torch, which every dry run would then pay for."""
    s = spec_for(name)
    positions = {"n_positions": 1024} if s["arch"] == "gpt2" else {"max_position_embeddings": 2048}
    return {"model_type": s["arch"], "architectures": [ARCHITECTURES[s["arch"]]],
            "num_hidden_layers": s["num_hidden_layers"], "hidden_size": s["hidden_size"],
            "intermediate_size": s["intermediate_size"], "vocab_size": s["vocab_size"], "dtype": "float32",
            **positions}


def _hf_config(s: dict[str, Any]):
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, OPTConfig, Qwen2Config

    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    if s["arch"] == "gpt2":
        return GPT2Config(vocab_size=s["vocab_size"], n_embd=s["hidden_size"], n_layer=s["num_hidden_layers"],
                          n_head=s["num_attention_heads"], n_inner=s["intermediate_size"], n_positions=1024,
                          **common)
    if s["arch"] == "opt":
        return OPTConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], ffn_dim=s["intermediate_size"],
                         num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                         word_embed_proj_dim=s["hidden_size"], do_layer_norm_before=True, enable_bias=True,
                         max_position_embeddings=2048, **common)
    extra = ({"num_local_experts": s["num_local_experts"], "num_experts_per_tok": s["num_experts_per_tok"]}
             if s["arch"] == "mixtral" else {})
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig}[s["arch"]]
    return cls(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
               num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
               num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=2048, **extra, **common)


def train_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer (the GPT-2 / Llama-3 / Qwen family) on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(name: str, seed: int, out_dir: str | os.PathLike) -> Path:
    """Build the built-in model ``name`` with weights drawn from ``seed`` and save it (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    s = spec_for(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(s["vocab_size"])
    cfg = _hf_config(s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "layerscope_builtin.json").write_text(json.dumps({"name": name, "seed": seed}) + "\n")
    return out


def lora_targets(model) -> list[str]:
    """Module names a LoRA adapter should wrap on this architecture (attention and MLP projections)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    # OPT's MLP is fc1/fc2 on the layer; Mixtral's experts are stacked weights, not Linear modules.
    for cand in (["q_proj", "v_proj", "down_proj"], ["q_proj", "v_proj", "fc2"], ["c_attn", "c_proj"],
                 ["q_proj", "v_proj"]):
        if set(cand) <= names:
            return cand
    raise ModelError(f"no known LoRA target modules in {type(model).__name__}")


def build_adapter(base_dir: str | os.PathLike, seed: int, out_dir: str | os.PathLike, rank: int = 4) -> Path:
    """Build a random (non-zero) LoRA adapter for the model in ``base_dir`` and save it (safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(base), init_lora_weights=False,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, cfg)
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
