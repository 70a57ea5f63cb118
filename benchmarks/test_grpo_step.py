"""End-to-end benchmark: one GRPO optimiser step of a whole model, ``GatedGRPOTrainer`` (``gate="sigmoid"``) against
TRL 1.16's ``GRPOTrainer`` (``loss_type="sapo"``, the same gate temperatures), on the same fixed batch.

    pytest benchmarks/test_grpo_step.py --benchmark-only

Generation is excluded: both trainers get the same batch of 8 completions (prompts of 64 tokens, completions of 512
with the last 1/8 of each masked, advantages drawn once) through their own ``training_step`` (forward, loss,
backward), then ``optimizer.step()`` and ``zero_grad``: the step a user waits for between two generations. On CUDA
the model is a randomly initialised Qwen2.5-1.5B (its config written here: 28 layers, H = 1536, V = 151,936, tied
embeddings; no download) in bfloat16; elsewhere (CPU, or ``FUSED_GATES_BENCH_SCALE=tiny``) a 2-layer Qwen2 of the same
vocabulary scale's tiny stand-in, so that the benchmark runs in seconds and cannot rot.

Correctness before timing: each trainer's first (untimed) step records the loss and the gradient norm of the
initial weights on the batch; the two trainers start from the same weights, so whichever row runs second fails
unless both agree (bfloat16: 2% relative) - the SAPO objective is on-policy here (no old log-probs), so the
gradient is the policy gradient both must compute. ``extra_info`` holds the step time's inputs, and on CUDA
``peak_bytes`` (``torch.cuda.max_memory_allocated`` over the timed steps: weights, gradients, optimiser state and
activations) and ``peak_extra_bytes`` (that minus what was allocated before the steps).
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import tempfile

import pytest
import torch
from head_impls import installed_version

DEVICE = os.environ.get("FUSED_GATES_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE == "cuda"
FULL = CUDA and os.environ.get("FUSED_GATES_BENCH_SCALE", "full") == "full"
# the tiny step takes tens of milliseconds, dominated by per-call overhead that a single round measures as noise
ROUNDS = int(os.environ.get("FUSED_GATES_BENCH_ROUNDS", "3" if FULL else "30"))
BATCH, PROMPT, COMPLETION = (8, 64, 512) if FULL else (8, 8, 32)
TAU_POS, TAU_NEG = 1.0, 1.05
LOW_PRECISION = CUDA  # bfloat16 weights on CUDA, float32 on CPU
DTYPE = torch.bfloat16 if LOW_PRECISION else torch.float32
GRAD_TOLERANCE = 2e-2 if LOW_PRECISION else 1e-4  # relative, on the loss and the gradient norm
MODEL = "qwen2.5-1.5b" if FULL else "tiny-qwen2"
TRAINERS = ("fused_gates_grpo_trainer", "trl_grpo_trainer")
MISSING = [m for m in ("trl", "transformers", "datasets") if importlib.util.find_spec(m) is None]

_FIRST_STEP: dict[str, tuple[float, float]] = {}  # trainer -> (loss, gradient norm) of its untimed first step


def _config():
    from transformers import Qwen2Config

    if FULL:  # Qwen2.5-1.5B
        return Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768,
                           rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return Qwen2Config(vocab_size=1003, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _model():
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(_config())
    return model.to(DTYPE)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", *[str(i) for i in range(10)], "+", "="]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def _batch(vocab: int) -> dict:
    """The fixed batch: what ``_generate_and_score_completions`` hands the loss, without old / reference log-probs
    (one iteration per generation, beta = 0)."""
    g = torch.Generator().manual_seed(1)
    completion_mask = torch.ones(BATCH, COMPLETION, dtype=torch.long)
    completion_mask[:, COMPLETION - COMPLETION // 8 :] = 0
    batch = {
        "prompt_ids": torch.randint(3, vocab, (BATCH, PROMPT), generator=g),
        "prompt_mask": torch.ones(BATCH, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (BATCH, COMPLETION), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(BATCH, generator=g),
    }
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    batch["num_items_in_batch"] = completion_mask.sum().to(DEVICE)
    batch["old_per_token_logps"] = None
    batch["ref_per_token_logps"] = None
    return batch


def _trainer(name: str, output_dir: str):
    from datasets import Dataset

    common = dict(output_dir=output_dir, per_device_train_batch_size=BATCH, num_generations=BATCH,
                  max_completion_length=COMPLETION, max_steps=1, learning_rate=1e-6, report_to=[],
                  logging_steps=1, save_strategy="no", seed=0, beta=0.0, temperature=1.0, bf16=LOW_PRECISION,
                  use_cpu=not CUDA)
    dataset = Dataset.from_list([{"prompt": f"{i} + {i} ="} for i in range(BATCH)])
    if name == "fused_gates_grpo_trainer":
        from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer

        args = GatedGRPOConfig(gate="sigmoid", loss_type="grpo", gate_tau_pos=TAU_POS, gate_tau_neg=TAU_NEG, **common)
        cls = GatedGRPOTrainer
    else:
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(loss_type="sapo", sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG, **common)
        cls = GRPOTrainer
    trainer = cls(model=_model(), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=dataset, processing_class=_tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=ROUNDS + 1)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _gradient_norm(model) -> float:
    squares = [p.grad.detach().float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def _measure(benchmark, name: str, batch: dict) -> tuple[tuple[float, float], int | None, int | None]:
    """Builds the trainer, takes the untimed first step (compilation, autotuning, optimiser state; its loss and
    gradient norm are the check), then times ``ROUNDS`` steps. Returns the check values and the CUDA peak / base."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(name, output_dir)
        trainer._prepare_inputs = lambda _generation_batch: batch  # generation excluded: the fixed batch instead
        model = trainer.model

        def one_step() -> torch.Tensor:
            loss = trainer.training_step(model, batch, batch["num_items_in_batch"])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad(set_to_none=True)
            if CUDA:
                torch.cuda.synchronize()
            return loss

        loss = trainer.training_step(model, batch, batch["num_items_in_batch"])
        first = (float(loss), _gradient_norm(model))
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
        before = None
        if CUDA:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        peak = torch.cuda.max_memory_allocated() if CUDA else None
    return first, peak, before


@pytest.mark.parametrize("name", TRAINERS)
def test_grpo_step(benchmark, name: str) -> None:
    benchmark.extra_info.update({
        "implementation": name, "mode": "grpo_step", "model": MODEL, "dtype": str(DTYPE).removeprefix("torch."),
        "device": DEVICE, "batch": BATCH, "prompt_length": PROMPT, "length": COMPLETION,
    })
    if MISSING:
        pytest.skip(f"the end-to-end step needs {', '.join(MISSING)} (pip install -e '.[trl]')")
    first, peak, before = _measure(benchmark, name, _batch(_config().vocab_size))
    _FIRST_STEP[name] = first
    if CUDA:
        torch.cuda.empty_cache()  # the trainer and its model are gone: the next row starts from the same memory
    others = {k: v for k, v in _FIRST_STEP.items() if k != name}
    check: dict | str = {"loss": first[0], "gradient_norm": first[1]}
    for other, (other_loss, other_norm) in others.items():
        for what, ours, theirs in (("loss", first[0], other_loss), ("gradient norm", first[1], other_norm)):
            if not abs(ours - theirs) <= GRAD_TOLERANCE * max(abs(theirs), 1e-6):
                check = (f"{name} first-step {what} {ours:.6g} differs from {other}'s {theirs:.6g} on the same "
                         f"weights and batch (tolerance {GRAD_TOLERANCE:g} relative)")
    benchmark.extra_info.update({
        "peak_bytes": peak, "peak_extra_bytes": None if peak is None else peak - before, "check": check,
        "device_name": torch.cuda.get_device_name() if CUDA else "cpu", "compared_with": sorted(others),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {d: installed_version(d) for d in ("torch", "triton", "transformers", "trl", "fused-gates")},
    })
    if isinstance(check, str):
        pytest.fail(check)
