"""A GatedGRPOTrainer and a fixed micro-batch, shared by the FSDP worker and its single-process reference.

The batch: 8 rows (4 per rank on 2 processes), prompts and completions of varied length, prompt groups of 2 rows that
straddle the processes (rows i and i + 4), advantages of both signs, old log-probs near the policy's so that ratios
spread around 1 (clipping acts), ``num_items_in_batch`` of the whole batch (as TRL gathers it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trl_fixtures as fixtures

from fused_gates.integrations.trl import GROUP_KEY, GatedGRPOConfig, GatedGRPOTrainer

ROWS, PROMPT, COMPLETION = 8, 5, 6


def make_trainer(model_dir: str, output_dir: str, *, beta: float, world: int) -> GatedGRPOTrainer:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    args = GatedGRPOConfig(output_dir=output_dir, per_device_train_batch_size=ROWS // world, num_generations=2,
                           max_completion_length=COMPLETION, max_steps=1, num_iterations=2, epsilon=0.1, beta=beta,
                           report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=False, disable_tqdm=True,
                           model_init_kwargs={"dtype": torch.float32})
    return GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                            train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer())


def fixed_batch(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole batch; ``policy`` (unwrapped, the same weights on every process) sets the old log-probs."""
    g = torch.Generator().manual_seed(3)
    vocab = policy.config.vocab_size
    prompt_ids = torch.randint(fixtures.FIRST_WORD, vocab, (ROWS, PROMPT), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0  # left padding
    prompt_mask[6, :1] = 0
    completion_ids = torch.randint(fixtures.FIRST_WORD, vocab, (ROWS, COMPLETION), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate((6, 2, 4, 6, 1, 5, 3, 6)):
        completion_mask[row, length:] = 0
    batch = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.2, 1.1, -0.6]),
        "num_items_in_batch": completion_mask.sum(),
        GROUP_KEY: torch.arange(ROWS) % (ROWS // 2),
    }
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-COMPLETION] = -100
    with torch.no_grad():
        logp = policy(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs
    batch["old_per_token_logps"] = (logp[:, -COMPLETION:] + 0.3 * torch.randn(ROWS, COMPLETION, generator=g)) \
        * completion_mask
    return batch


def rows_of(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    size = ROWS // world
    return {k: v if v.dim() == 0 else v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def reference_logps(trainer: GatedGRPOTrainer, ref_model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """TRL's no-grad pass (its batching, our head) on the reference model."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(ref_model, ids, attention, COMPLETION)
    return logps


LOGGED = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
          "clip_ratio/low_min", "clip_ratio/high_max", "eur", "gate/mean", "ratio/mean", "ratio/min", "ratio/max")
