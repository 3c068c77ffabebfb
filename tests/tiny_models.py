"""Small transformers models with random weights, one per family the compiler must handle."""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")
VOCAB = 256


def tiny_model(family: str, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=None))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4))
    elif family == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                                               num_attention_heads=4, word_embed_proj_dim=64))
    elif family == "bert":
        model = tf.BertModel(tf.BertConfig(**common), add_pooling_layer=False)
    else:
        raise ValueError(family)
    _perturb_norms(model)
    return model.eval()


def _perturb_norms(model: torch.nn.Module) -> None:
    """Random-init norms are all ones and zeros, which would make norm folding
    trivially exact; give them real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name or "layernorm" in name.lower():
                p.copy_(p + 0.3 * torch.randn_like(p))


def tiny_inputs(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, seq)),)


class DataDependent(torch.nn.Module):
    """Branches on a value (``if x.sum() > 0``): torch.export cannot trace it, statically or not."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x
