"""``GatedGRPOConfig(logprob_support=...)``: the refusals and the warning; and the experiment that shows the bias and
its removal, on the tiny model sampled with top-k / top-p by a sampler that returns processed log-probs as vLLM does:
with ``"full"`` TRL's importance-sampling ratio ``pi_old / pi_sampler`` is the kept mass S of each token (mean ratio
= mean S < 1), with ``"sampler"`` it is 1 (within float32), and the later iteration's loss renormalises over the kept
sets the old-policy pass replayed."""

from __future__ import annotations

import math
import zlib
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the trainer tests")

import trl_fixtures as fixtures

from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer
from fused_gates.integrations.trl.sampler_support import KEPT_IDS_KEY, sampler_truncation
from fused_gates.reference import reference_sampler_support

pytestmark = pytest.mark.usefixtures("single_threaded")


class TruncatedSampler:
    """A ``rollout_func`` that samples the trainer's current policy with temperature, top-k, top-p and min-p (vLLM
    v1's semantics, materialised logits: the tiny vocabulary) and returns each token's processed log-prob (over the
    kept set, vLLM's ``processed_logprobs``). Records the kept mass S of every sampled token."""

    def __init__(self, max_completion_length: int, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
        self.max_completion_length = max_completion_length
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p
        self.kept_mass: list[list[float]] = []  # per call
        self.calls = 0

    @torch.no_grad()
    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list]:
        self.calls += 1
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        completions, logprobs = [], []
        self.kept_mass.append([])
        for i, ids in enumerate(prompt_ids):
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.calls}|{i}|{prompts[i]}".encode()))
            sequence, sampled, scores = list(ids), [], []
            for _ in range(self.max_completion_length):
                logits = model(input_ids=torch.tensor([sequence])).logits[0, -1].double() / trainer.temperature
                kept = reference_sampler_support(logits.unsqueeze(0), torch.tensor([self.top_k]),
                                                 torch.tensor([self.top_p]), torch.tensor([self.min_p]))[0]
                processed = torch.log_softmax(logits.masked_fill(~kept, -math.inf), 0)
                token = int(torch.multinomial(processed.exp(), 1, generator=g))
                self.kept_mass[-1].append(float(torch.softmax(logits, 0)[kept].sum()))
                sampled.append(token)
                scores.append(float(processed[token]))
                sequence.append(token)
                if token == fixtures.EOS:
                    break
            completions.append(sampled)
            logprobs.append(scores)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}


TRUNCATION = dict(top_k=6, top_p=0.8)


def run_experiment(model_dir: str, output_dir, support: str, **options):
    """Two generation batches, two iterations each, with the vLLM correction at token level (TRL computes the old
    log-probs and the ratio ``pi_old / pi_sampler`` per token)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    args = GatedGRPOConfig(output_dir=str(output_dir), **{**fixtures.TRAINING, "max_steps": 2},
                           logprob_support=support, vllm_importance_sampling_mode="token_truncate",
                           **TRUNCATION, **options)
    sampler = TruncatedSampler(fixtures.MAX_COMPLETION, **TRUNCATION)
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=sampler)
    fixtures.emulate_vllm_sampler(trainer)
    batches = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        output = original(inputs)
        batches.append(output)
        return output

    trainer._generate_and_score_completions = spy
    trainer.train()
    return trainer, sampler, batches


def _first_log(trainer, key: str) -> float:
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def test_full_support_ratio_is_the_kept_mass_and_sampler_support_removes_it(model_dir, tmp_path):
    full, full_sampler, _ = run_experiment(model_dir, tmp_path / "full", "full")
    ratio_full = _first_log(full, "sampling/importance_sampling_ratio/mean")
    first_batch = full_sampler.kept_mass[0]  # the first step's batch
    mass = sum(first_batch) / len(first_batch)
    assert mass < 0.95, "the truncation must remove mass for the experiment to mean anything"
    assert abs(ratio_full - mass) < 1e-4, (ratio_full, mass)

    ours, _, batches = run_experiment(model_dir, tmp_path / "sampler", "sampler")
    ratio = _first_log(ours, "sampling/importance_sampling_ratio/mean")
    assert abs(ratio - 1.0) < 1e-4, ratio
    assert abs(_first_log(ours, "sampler/is_ratio_support/mean") - ratio) < 1e-4
    assert abs(_first_log(ours, "sampler/is_ratio_full/mean") - mass) < 1e-4
    assert _first_log(ours, "sampler/is_ratio_support/outside_0.9_1.1") == 0.0
    assert _first_log(ours, "sampler/is_ratio_full/outside_0.9_1.1") > 0.2
    assert 0 < _first_log(ours, "sampler/kept_mass/min") <= _first_log(ours, "sampler/kept_mass/mean") < 1
    # the old-policy pass replayed the kept sets; the loss of the later iteration renormalised over them
    kept = batches[0][KEPT_IDS_KEY]
    assert kept.shape[:2] == batches[0]["completion_ids"].shape
    sizes = (kept >= 0).sum(-1)[batches[0]["completion_mask"].bool()]
    assert sizes.max() <= 6 and sizes.min() >= 1
    print(f"\nfull support: ratio mean {ratio_full:.6f}, kept mass mean {mass:.6f}; sampler support: ratio mean "
          f"{ratio:.6f}, outside [0.9, 1.1]: full {_first_log(ours, 'sampler/is_ratio_full/outside_0.9_1.1'):.3f}, "
          f"support {_first_log(ours, 'sampler/is_ratio_support/outside_0.9_1.1'):.3f}")


def test_sampler_support_on_policy_replays_in_the_loss(model_dir, tmp_path, monkeypatch):
    """Without an old-policy pass (one iteration, no vLLM correction) the loss replays the support itself."""
    import fused_gates.integrations.trl.trainer as trainer_module

    seen = []
    original = trainer_module.gated_policy_loss

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("top_k", "top_p", "min_p", "kept_token_ids")})
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "gated_policy_loss", spy)
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "max_steps": 1, "num_iterations": 1},
                           logprob_support="sampler", **TRUNCATION)
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=TruncatedSampler(fixtures.MAX_COMPLETION, **TRUNCATION))
    trainer.train()
    assert seen and all(s["top_k"] == 6 and s["top_p"] == 0.8 and s["kept_token_ids"] is None for s in seen)
    assert 0 < _first_log(trainer, "sampler/kept_mass/mean") < 1


def test_a_support_beyond_the_kept_bound_names_the_bound(model_dir, tmp_path):
    with pytest.raises(ValueError, match="sampler_kept_bound: return_kept_ids: a replayed support holds"):
        run_experiment(model_dir, tmp_path, "sampler", sampler_kept_bound=2)


def test_truncated_vllm_correction_with_full_support_warns(model_dir, tmp_path):
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "max_steps": 1}, top_p=0.9)
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION))
    fixtures.emulate_vllm_sampler(trainer)
    with pytest.warns(UserWarning, match="logprob_support='sampler' renormalises"):
        trainer.train()


@pytest.mark.parametrize("options,message", [
    (dict(logprob_support="sampler"), "needs truncated sampling"),
    (dict(logprob_support="nucleus", top_p=0.9), "logprob_support='nucleus'; choose one of full, sampler"),
    (dict(logprob_support="sampler", top_p=0.9, sampler_kept_bound=0), "sampler_kept_bound: must be a positive"),
], ids=["sampler_without_truncation", "unknown_support", "bad_bound"])
def test_meaningless_support_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GatedGRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **options)


def test_generation_kwargs_override_the_truncation():
    args = GatedGRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, top_p=0.9, top_k=0,
                           generation_kwargs={"top_k": 5, "top_p": 1.0}, logprob_support="sampler")
    assert sampler_truncation(args) == {"top_k": 5}
