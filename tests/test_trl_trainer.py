"""GatedGRPOTrainer against TRL 1.16's own GRPOTrainer loss on the same generated batch, with a tiny local model."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the trainer tests")
transformers = pytest.importorskip("transformers", reason="transformers (the 'trl' extra) is needed")
datasets = pytest.importorskip("datasets", reason="datasets (the 'trl' extra) is needed")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>", *[str(i) for i in range(10)],
         "+", "=", "what", "is", "ok"]


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, tie_word_embeddings=False,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.Qwen2ForCausalLM(config).float()


def think_reward(completions, **kwargs):
    return [float(c.count("<think>")) - 0.1 * len(c.split()) for c in completions]


def dataset(n: int = 8):
    return datasets.Dataset.from_list([{"prompt": f"what is {i % 10} + {(3 * i) % 10} ="} for i in range(n)])


def make_trainer(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "run"), model_init_kwargs={"dtype": torch.float32},
                   per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                   logging_steps=1, save_strategy="no", seed=0, temperature=1.0, bf16=False)
    options.update(overrides)
    args = GatedGRPOConfig(**options)
    # saved and loaded by path, as users pass a model name: TRL then builds the reference model from it
    model_dir = tmp_path / "tiny-model"
    if not model_dir.exists():
        tiny_model().save_pretrained(model_dir)
    return GatedGRPOTrainer(model=str(model_dir), reward_funcs=think_reward, args=args, train_dataset=dataset(),
                            processing_class=tiny_tokenizer())


def generated_batch(trainer, perturb: float = 0.0):
    rows = [dict(r) for r in dataset(4)]
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions(rows)
    if perturb:
        # a policy update since sampling: ratios differ from 1 against the stored old log-probs
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return inputs


def loss_and_grads(compute, trainer, inputs):
    trainer.model.zero_grad()
    loss = compute(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def trl_view(trainer, loss_type):
    view = copy.copy(trainer)
    view.loss_type = loss_type
    view._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return view


CASES = {
    "sigmoid_equals_trl_sapo": (dict(gate="sigmoid", loss_type="grpo", gate_tau_pos=2.0, gate_tau_neg=3.0,
                                     sapo_temperature_pos=2.0, sapo_temperature_neg=3.0), "sapo"),
    "clip_equals_trl_grpo": (dict(gate="clip", loss_type="grpo", epsilon=0.05), "grpo"),
    "clip_equals_trl_dapo": (dict(gate="clip", loss_type="dapo", epsilon=0.05, epsilon_high=0.08), "dapo"),
    "clip_kl_sequence_bnpo": (dict(gate="clip", loss_type="bnpo", beta=0.1, importance_sampling_level="sequence",
                                   epsilon=0.05), "bnpo"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_and_gradients_equal_trl_on_the_same_batch(tmp_path, case):
    overrides, trl_type = case
    trainer = make_trainer(tmp_path, num_iterations=2, **overrides)
    inputs = generated_batch(trainer, perturb=0.05)
    assert inputs["old_per_token_logps"] is not None
    ours, our_grads = loss_and_grads(trainer._compute_loss, trainer, inputs)
    view = trl_view(trainer, trl_type)
    theirs, their_grads = loss_and_grads(lambda m, i: GRPOTrainer._compute_loss(view, m, i), trainer, inputs)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        scale = grad.abs().max().item()
        assert (our_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-9, name
    mode = "train" if trainer.model.training else "eval"
    ours_logged, trl_logged = trainer._metrics[mode], view._metrics[mode]
    assert ours_logged["ratio/max"][-1] != pytest.approx(1.0)
    assert ours_logged["entropy"][-1] == pytest.approx(trl_logged["entropy"][-1], rel=1e-5)
    if overrides["gate"] == "clip" and overrides.get("importance_sampling_level", "token") == "token":
        region = trl_logged["clip_ratio/region_mean"][-1]
        assert region > 0
        assert ours_logged["eur"][-1] == pytest.approx(1 - region, abs=1e-6)


def test_old_logprob_pass_matches_trl_fused_head(tmp_path):
    trainer = make_trainer(tmp_path)
    inputs = generated_batch(trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].size(1)
    with torch.no_grad():
        ours, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, keep, compute_entropy=True)
        theirs, their_ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attn, keep,
                                                                             compute_entropy=True)
    mask = inputs["completion_mask"].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5)
    assert torch.allclose(ent[mask], their_ent[mask], atol=1e-5)


@pytest.mark.parametrize("gate", ["clip", "sigmoid", "erf", "arctan", "softsign"])
def test_training_steps_update_weights_and_log_gate_metrics(tmp_path, gate):
    trainer = make_trainer(tmp_path, gate=gate, loss_type="grpo", gate_tau_pos=10.0, gate_tau_neg=12.0,
                           num_iterations=2, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "eur" in entry]
    assert logs, trainer.state.log_history
    for key in ("eur", "entropy", "gate/mean", "ratio/mean", "ratio/min", "ratio/max"):
        assert all(math.isfinite(entry[key]) for entry in logs), key
    # the second iteration on a batch reuses it after an update: ratios move off 1 and some updates are damped
    assert any(entry["eur"] < 1.0 for entry in logs)


UNSUPPORTED = {
    "sapo_loss_type": (dict(loss_type="sapo"), "gate='sigmoid' with loss_type='grpo'"),
    "cispo": (dict(loss_type="cispo"), "not a gated objective"),
    "delta": (dict(delta=1.5), "delta"),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    "off_policy_mask": (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    "unknown_gate": (dict(gate="tanh"), "unknown gate 'tanh'"),
    "bad_tau": (dict(gate_tau_pos=0.0), "gate_tau_pos must be > 0"),
}


@pytest.mark.parametrize("case", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_configuration_fails_at_construction(tmp_path, case):
    overrides, message = case
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **overrides)


def test_lora_with_gradient_checkpointing_trains_adapters_only(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT (the 'trl' extra) is needed for the LoRA test")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model_dir = tmp_path / "tiny-model"
    tiny_model().save_pretrained(model_dir)
    args = GatedGRPOConfig(output_dir=str(tmp_path / "run"), model_init_kwargs={"dtype": torch.float32},
                           per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                           learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                           seed=0, bf16=False, gate="erf", gate_tau_pos=10.0, gate_tau_neg=12.0, num_iterations=2,
                           beta=0.05, gradient_checkpointing=True)
    trainer = GatedGRPOTrainer(model=str(model_dir), reward_funcs=think_reward, args=args, train_dataset=dataset(),
                               processing_class=tiny_tokenizer(), peft_config=lora)
    lm_head = trainer.model.get_output_embeddings().weight
    assert not lm_head.requires_grad  # frozen head: the fused loss skips dW
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in adapters.items())
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())
    logs = [entry for entry in trainer.state.log_history if "eur" in entry]
    assert logs and all(math.isfinite(entry["kl"]) for entry in logs)
