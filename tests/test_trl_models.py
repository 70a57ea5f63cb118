"""Model families through the fused head: each logit convention (scale, soft-cap, temperature) against the model's own
logits, the MoE router loss against the model's own, and vision-language inputs passed through to the backbone
(a tiny Qwen2-VL built offline): GatedGRPOTrainer's loss and gradients equal TRL's on a batch with an image."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the model-family tests")
transformers = pytest.importorskip("transformers", reason="transformers (the 'trl' extra) is needed")

import trl_fixtures as fixtures  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer  # noqa: E402
from fused_gates.integrations.trl.fused_head import add_gated_head, logit_scale, logit_transform  # noqa: E402

TEMPERATURE = 0.7

EXPECTED_SCALE = {  # what each family's own forward multiplies its logits by
    "dense": 1.0, "tied": 1.0, "softcapped": 1.0, "moe": 1.0, "scaled_logit_scale": 2.5,
    "scaled_logits_scaling": 1 / 0.4, "scaled_hyperclovax": 2.5, "scaled_lm_head_multiplier": 2.5,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_batch(vocab: int, rows: int = 3, length: int = 9, prompt: int = 3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(fixtures.FIRST_WORD, vocab, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :prompt] = -100
    return ids, attention, labels


def own_logprobs(model, ids, attention, labels, temperature):
    """Log-probs and entropies of the model's own (scaled, soft-capped) logits over the temperature."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double() / temperature
    log_probs = torch.log_softmax(logits, -1)
    targets = labels[:, 1:]
    mask = targets != -100
    logp = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    return logp, entropy, mask


@pytest.mark.parametrize("family", list(EXPECTED_SCALE))
def test_fused_head_matches_the_models_own_logits(family):
    model = fixtures.tiny_model(family).eval()
    assert logit_scale(model.config) == pytest.approx(EXPECTED_SCALE[family])
    ids, attention, labels = token_batch(model.config.vocab_size)
    expected, expected_entropy, mask = own_logprobs(model, ids, attention, labels, TEMPERATURE)
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    add_gated_head(model, logit_transform(model.config, TEMPERATURE))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        trl = trl_model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert torch.allclose(ours.log_probs.double(), expected, atol=2e-5), family
    assert torch.allclose(ours.entropy.double(), expected_entropy, atol=2e-5), family
    assert torch.allclose(ours.log_probs, trl.log_probs, atol=2e-5), family
    assert torch.equal(ours.label_mask, mask)
    if EXPECTED_SCALE[family] != 1.0 or family == "softcapped":
        # the convention matters: the bare head h W^T / T gives other log-probs
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
            raw = torch.log_softmax((hidden @ model.get_output_embeddings().weight.T).double() / TEMPERATURE, -1)
        raw = raw.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        assert (raw - expected).abs().max() > 1e-2


def test_router_loss_equals_the_models_own():
    model = fixtures.tiny_model("moe").eval()
    ids, attention, labels = token_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss
    add_gated_head(model, logit_transform(model.config, 1.0))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        loss_pass = model(input_ids=ids, attention_mask=attention, fused_gates_head=lambda h, w, b: h.sum())
    assert ours.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_pass["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 0


# -- vision-language inputs ------------------------------------------------------------------------------------------

IMAGE, VISION_START, VISION_END = 30, 31, 32


def tiny_vlm():
    torch.manual_seed(0)
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, pad_token_id=fixtures.PAD,
                eos_token_id=fixtures.EOS, bos_token_id=fixtures.EOS,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                        video_token_id=IMAGE + 9, vision_start_token_id=VISION_START,
                                        vision_end_token_id=VISION_END)
    model = transformers.Qwen2VLForConditionalGeneration(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def image_batch():
    """Two rows, one 2x2-patch image each (4 image tokens in the prompt), completions of different length."""
    g = torch.Generator().manual_seed(2)
    rows = 2
    prompt = torch.tensor([[VISION_START, IMAGE, IMAGE, IMAGE, IMAGE, VISION_END, 5, 6]] * rows)
    completion = torch.randint(fixtures.FIRST_WORD, IMAGE, (rows, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ids = torch.cat([prompt, completion], 1)
    return {
        "prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
        "completion_mask": completion_mask, "advantages": torch.tensor([0.8, -1.1]),
        "num_items_in_batch": completion_mask.sum(),
        "pixel_values": torch.randn(rows * 4, 3 * 2 * 2, generator=g),
        "image_grid_thw": torch.tensor([[1, 2, 2]] * rows), "num_images": [1] * rows,
        "mm_token_type_ids": (ids == IMAGE).long(),
        "old_per_token_logps": -3.0 + 0.5 * torch.randn(rows, 5, generator=g),
    }


def loss_and_gradients(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_vision_language_inputs_reach_the_backbone(tmp_path):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    model_dir = tmp_path / "tiny-vlm"
    tiny_vlm().save_pretrained(model_dir)
    options = dict(per_device_train_batch_size=2, num_generations=2, max_completion_length=5, report_to=[],
                   use_cpu=True, save_strategy="no", bf16=False, num_iterations=2, epsilon=0.1,
                   model_init_kwargs={"dtype": torch.float32})
    build = dict(model=str(model_dir), reward_funcs=fixtures.reward, train_dataset=fixtures.prompts_dataset(),
                 processing_class=fixtures.tiny_tokenizer())
    theirs = GRPOTrainer(args=GRPOConfig(output_dir=str(tmp_path / "trl"), **options), **build)
    ours = GatedGRPOTrainer(args=GatedGRPOConfig(output_dir=str(tmp_path / "ours"), **options), **build)
    inputs = image_batch()
    expected, expected_grads = loss_and_gradients(theirs, inputs)
    got, got_grads = loss_and_gradients(ours, inputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    assert any("visual" in name for name in got_grads)  # the image went through the vision tower
    for name, grad in expected_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-9, name
    # and the image matters: without it the loss differs
    text_only = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw", "num_images")}
    text_only["mm_token_type_ids"] = torch.zeros_like(inputs["mm_token_type_ids"])
    without, _ = loss_and_gradients(ours, text_only)
    assert abs(without.item() - got.item()) > 1e-4


@pytest.mark.parametrize("scale", [0.0, -2.0, float("inf")])
def test_a_logit_scale_the_head_cannot_fold_is_refused_naming_the_model_type(scale):
    config = transformers.CohereConfig(logit_scale=scale)
    with pytest.raises(ValueError, match="model type 'cohere' scales its logits"):
        logit_transform(config, 1.0)


def test_scale_and_cap_fold_into_the_cores_temperature_and_cap():
    # z = c tanh(s x / c) / T  ==  (c / s) tanh(x / (c / s)) / (T / s)
    config = transformers.Gemma2Config(final_logit_softcapping=30.0)
    config.logit_scale = 4.0
    transform = logit_transform(config, 0.8)
    assert (transform.temperature, transform.logit_softcap) == (0.8 / 4.0, 30.0 / 4.0)
    x = torch.linspace(-50, 50, 101, dtype=torch.float64)
    folded = transform.logit_softcap * torch.tanh(x / transform.logit_softcap) / transform.temperature
    assert torch.allclose(folded, 30.0 * torch.tanh(4.0 * x / 30.0) / 0.8)


def test_patching_again_replaces_the_previous_head():
    model = fixtures.tiny_model("dense").eval()
    ids, attention, labels = token_batch(model.config.vocab_size)
    expected, _, _ = own_logprobs(model, ids, attention, labels, 2.0)
    add_gated_head(model, logit_transform(model.config, 0.5))
    add_gated_head(model, logit_transform(model.config, 2.0))  # e.g. the model reused by a second trainer
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        plain = model(input_ids=ids, attention_mask=attention).logits  # the original forward is still there
    assert torch.allclose(ours.log_probs.double(), expected, atol=2e-5)
    assert plain.shape[-1] == model.config.vocab_size
