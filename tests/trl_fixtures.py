"""Tiny local models, tokenizer, data and a replayed rollout for the trainer tests (offline, CPU).

:class:`ReplayRollout` stands in for sampling (TRL's ``rollout_func``): completions of varied length (some end with
EOS, some are truncated at ``max_completion_length``), drawn from a generator seeded by the prompt's text, its
occurrence within the call and the call's number, so every trainer (TRL's and ours, one process or several) trains
on the same completions. Its sampler log-probabilities (for the vLLM importance-sampling correction) are the
tiny model's near-uniform ``-log V`` plus noise (optionally with unscorable tokens, None as vLLM returns them), and it
can return a tool mask (``env_mask``).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["<pad>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>", *[str(i) for i in range(10)],
         "+", "=", "what", "is", "ok", "no", "so", "then", "maybe"]
PAD, EOS = 0, 1
FIRST_WORD = 3  # completions draw from the non-special words


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


_COMMON = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD,
               eos_token_id=EOS, bos_token_id=EOS)

FAMILIES: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "dense": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False)),
    "tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True)),
    # a cap small enough to bend the tiny model's logits (Gemma 2 ships 30)
    "softcapped": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **_COMMON, head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh")),
    "scaled_logit_scale": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**_COMMON,
                                                                                           logit_scale=2.5)),
    "scaled_logits_scaling": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **_COMMON, logits_scaling=0.4)),
    "scaled_hyperclovax": lambda: transformers.HyperCLOVAXForCausalLM(transformers.HyperCLOVAXConfig(
        **_COMMON, logits_scaling=2.5)),
    "scaled_lm_head_multiplier": lambda: transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        **_COMMON, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4,
        mamba_chunk_size=8, lm_head_multiplier=2.5)),
    "moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **{**_COMMON, "intermediate_size": 16}, moe_intermediate_size=8, shared_expert_intermediate_size=8,
        num_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
        tie_word_embeddings=False)),
}


def tiny_model(family: str = "dense", seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = FAMILIES[family]().float()
    with torch.no_grad():  # logits of a realistic spread, so that policy updates move the ratios
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def save_tiny_model(folder: Path, family: str = "dense") -> str:
    if not (folder / "config.json").exists():
        tiny_model(family).save_pretrained(folder)
    return str(folder)


def prompts_dataset(n: int = 16) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": f"what is {i % 10} + {(3 * i + 1) % 10} ="} for i in range(n)])


def reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Varied, length-dependent rewards: the loss types weigh lengths differently."""
    return [c.count("ok") + 0.5 * c.count("so") - 0.15 * len(c.split()) for c in completions]


class ReplayRollout:
    """A deterministic ``rollout_func`` (see the module docstring)."""

    def __init__(self, max_completion_length: int, *, tool_mask: bool = False, unscorable: bool = False,
                 seed: int = 0):
        self.max_completion_length = max_completion_length
        self.tool_mask = tool_mask
        self.unscorable = unscorable  # a sampler that could not score some tokens (vLLM returns None there)
        self.seed = seed
        self.calls = 0

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list]:
        tokenizer = trainer.processing_class
        self.calls += 1
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        seen: dict[str, int] = {}
        completion_ids, logprobs, env_mask = [], [], []
        vocab = len(WORDS)
        for prompt in prompts:
            occurrence = seen.get(prompt, 0)
            seen[prompt] = occurrence + 1
            key = f"{self.seed}|{self.calls}|{occurrence}|{prompt}".encode()
            g = torch.Generator().manual_seed(zlib.crc32(key))
            length = int(torch.randint(1, self.max_completion_length + 1, (1,), generator=g))
            ids = torch.randint(FIRST_WORD, vocab, (length,), generator=g).tolist()
            if length < self.max_completion_length and torch.rand((), generator=g) < 0.8:
                ids[-1] = EOS
            completion_ids.append(ids)
            sampled = (-math.log(vocab) + 0.4 * torch.randn(length, generator=g)).tolist()
            if self.unscorable and length > 2:
                sampled[1] = None
            logprobs.append(sampled)
            env_mask.append([0 if (self.tool_mask and 0 < i < length - 1 and i % 3 == 1) else 1
                             for i in range(length)])
        output = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}
        if self.tool_mask:
            output["env_mask"] = env_mask
        return output


def emulate_vllm_sampler(trainer: Any) -> None:
    """Make the trainer treat the replayed log-probs as a vLLM sampler's: TRL then computes the old log-probs and the
    importance-sampling ratio as with vLLM (the weight sync is a no-op here)."""
    trainer.use_vllm = True
    trainer.vllm_generation = SimpleNamespace(sync_weights=lambda: None)
    trainer._last_loaded_step = -1


MAX_COMPLETION = 8
TRAINING = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=MAX_COMPLETION, max_steps=3,
                num_iterations=2, epsilon=0.1, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, bf16=False,
                disable_tqdm=True, model_init_kwargs={"dtype": torch.float32})
"""Two iterations per generation batch (the second is off-policy, so ratios move and clipping acts), three plain-SGD
steps (two generation batches), float32."""


def train(trainer_class, config_class, model_dir: str, output_dir: Path, options: dict[str, Any] | None = None, *,
          tool_mask: bool = False, vllm: bool = False, unscorable: bool = False, evaluate: bool = False,
          callbacks=None):
    """A short training run on replayed completions; returns the trainer."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    args = config_class(output_dir=str(output_dir), **{**TRAINING, **(options or {})})
    extra = {"eval_dataset": prompts_dataset(4)} if evaluate else {}
    trainer = trainer_class(model=model_dir, reward_funcs=reward, args=args, train_dataset=prompts_dataset(),
                            processing_class=tiny_tokenizer(), callbacks=callbacks,
                            rollout_func=ReplayRollout(MAX_COMPLETION, tool_mask=tool_mask, unscorable=unscorable),
                            **extra)
    if vllm:
        emulate_vllm_sampler(trainer)
    trainer.train()
    return trainer


def step_logs(trainer) -> list[dict[str, float]]:
    """The per-step (and per-evaluation) log entries."""
    return [entry for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]


RELATIVE_TOLERANCE = 1e-5
ABSOLUTE_FLOOR = 1e-7  # the float32 rounding of a metric whose value is ~0


def close(a: float | None, b: float | None) -> bool:
    """Equal within 1e-5 relative (NaN equals NaN, None equals None)."""
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b)) + ABSOLUTE_FLOOR


TIMING_KEYS = {"step_time", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def log_mismatches(theirs: list[dict[str, float]], ours: list[dict[str, float]]) -> list[str]:
    """Every key TRL logs, at every step: missing in ours or not close."""
    problems = []
    if len(theirs) != len(ours):
        return [f"{len(theirs)} log entries from TRL, {len(ours)} from ours"]
    for step, (trl_entry, our_entry) in enumerate(zip(theirs, ours, strict=True)):
        for key in sorted(set(trl_entry) - TIMING_KEYS):
            if key not in our_entry:
                problems.append(f"step {step} {key}: logged by TRL, not by us")
            elif not close(trl_entry[key], our_entry[key]):
                problems.append(f"step {step} {key}: TRL {trl_entry[key]!r}, ours {our_entry[key]!r}")
    return problems


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matrices: OpenMP threads only contend with each other (and with other jobs on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_models(root: Path) -> dict[str, str]:
    """Every tiny model family, saved under ``root`` (loaded by path, as users pass a model name)."""
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}
