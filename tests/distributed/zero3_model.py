"""The tiny model and the fixed batch shared by the ZeRO-3 worker and its single-process reference."""

from __future__ import annotations

import torch
import transformers

BATCH, PROMPT, COMPLETION = 4, 3, 5


def tiny_causal_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).float()


def full_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 53, (BATCH, PROMPT + COMPLETION), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0
    advantages = torch.randn(BATCH, generator=g)
    old = -4.0 + 0.5 * torch.randn(BATCH, COMPLETION, generator=g)
    return ids, attention, advantages, old, COMPLETION


def batch_for_rank(rank: int, world: int):
    ids, attention, advantages, old, keep = full_batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return ids[rows], attention[rows], advantages[rows], old[rows], keep


def loss_options() -> dict:
    return dict(gate="erf", tau_pos=2.0, tau_neg=3.0, loss_type="grpo", backend="torch")
