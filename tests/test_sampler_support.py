"""Log-probs on the sampler's support: kept sets given and replayed (top_k / top_p / min_p) against the float64
reference (``reference_sampler_support`` + ``reference_loss(kept_mask=...)``) for every gate and loss type, with
gradients; the replay against a literal sort-and-cumsum implementation of vLLM's sampler; the no-op options bitwise
equal to the full vocabulary; the kept sets returned and reused; the named errors of bad inputs."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from helpers import TOLERANCES, assert_within, make_inputs, max_abs, output_errors, run_loss, run_reference

from fused_gates import LOSS_TYPES, PAPER_GATES, POLICY_OBJECTIVES, gated_policy_loss, token_logprobs
from fused_gates import support as support_module
from fused_gates.reference import reference_sampler_support

OPTIONS = dict(tau_pos=2.0, tau_neg=3.0, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=9, beta=0.04,
               use_bias_correction_kl=True, temperature=0.7, entropy_coef=0.01)
REPLAYS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.15),
    "all_three": dict(top_k=9, top_p=0.7, min_p=0.05),
}


def _logits(inputs, dtype=torch.float64, temperature=1.0, logit_softcap=None, bias=True):
    h, w, b = (t.to(dtype).to(torch.float64) for t in (inputs.hidden, inputs.weight, inputs.bias))
    x = h @ w.T + (b if bias else 0)
    if logit_softcap is not None:
        x = logit_softcap * torch.tanh(x / logit_softcap)
    return x / temperature


def _per_row(value, rows: int, length: int):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.tensor([value] * rows)
    return value.unsqueeze(1).expand(rows, length).reshape(-1)


def replayed_mask(inputs, *, top_k=None, top_p=None, min_p=None, dtype=torch.float64, temperature=1.0,
                  logit_softcap=None, bias=True):
    """The reference support [B, T, V]: vLLM's kept set of each token plus the token itself."""
    logits = _logits(inputs, dtype, temperature, logit_softcap, bias)
    rows, length, vocab = logits.shape
    kept = reference_sampler_support(logits.reshape(-1, vocab), _per_row(top_k, rows, length),
                                     _per_row(top_p, rows, length), _per_row(min_p, rows, length))
    kept = kept.reshape(rows, length, vocab)
    kept.scatter_(2, inputs.ids.unsqueeze(2), True)
    return kept


def kept_ids_of(mask, pad_to: int | None = None):
    """A mask [B, T, V] as -1-padded id lists [B, T, K] in a shuffled order."""
    rows, length, _ = mask.shape
    width = pad_to or int(mask.sum(-1).max())
    g = torch.Generator().manual_seed(7)
    ids = torch.full((rows, length, width), -1, dtype=torch.int64)
    for b in range(rows):
        for t in range(length):
            kept = mask[b, t].nonzero().squeeze(1)
            ids[b, t, : kept.numel()] = kept[torch.randperm(kept.numel(), generator=g)]
    return ids


LAYOUTS = {"columns": None, "mask": 0}  # a support held as columns (the default here), or as a mask (forced)


@pytest.fixture(params=LAYOUTS.values(), ids=LAYOUTS.keys())
def layout(request, monkeypatch):
    """Runs a test with the support as columns and as a dense mask beside the logits buffer."""
    if request.param is not None:
        monkeypatch.setattr(support_module, "SPARSE_SUPPORT_MAX", request.param)
    return request.param


def compare(inputs, support_options: dict, kept_mask, *, dtype=torch.float64, backend="torch", tolerance=None,
            bias=True, **options):
    ours = run_loss(inputs, dtype=dtype, backend=backend, bias=bias, **options, **support_options)
    reference = run_reference(inputs, dtype=dtype, bias=bias, kept_mask=kept_mask, **options)
    errors = output_errors(ours, reference)
    mask = inputs.mask.bool()
    errors["kept_mass"] = max_abs(ours.out.kept_mass[mask], reference.out.kept_mass[mask])
    assert_within(errors, tolerance or TOLERANCES[dtype], against=f"the reference over the support ({backend})")
    return ours, reference


# -- the loss over the support, every gate and loss type ---------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", PAPER_GATES + POLICY_OBJECTIVES)
def test_kept_sets_match_reference_for_every_gate_and_loss_type(gate, loss_type, layout):
    inputs = make_inputs(vocab=29, seed=zlib.crc32(f"kept-{gate}-{loss_type}".encode()) % 1000)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 7, 29, generator=g) < 0.4
    mask.scatter_(2, inputs.ids.unsqueeze(2), True)
    compare(inputs, {"kept_token_ids": kept_ids_of(mask, pad_to=31)}, mask, gate=gate, loss_type=loss_type,
            memory_budget_mb=0.002, **OPTIONS)


@pytest.mark.parametrize("replay", REPLAYS.values(), ids=REPLAYS.keys())
@pytest.mark.parametrize("gate", PAPER_GATES)
def test_replayed_support_matches_reference_for_every_gate(gate, replay, layout):
    inputs = make_inputs(batch=5, length=6, vocab=43, seed=zlib.crc32(f"replay-{gate}".encode()) % 1000)
    mask = replayed_mask(inputs, temperature=OPTIONS["temperature"], **replay)
    assert not mask.all(), "the replay must truncate somewhere for the test to mean anything"
    compare(inputs, replay, mask, gate=gate, memory_budget_mb=0.003, **OPTIONS)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_replayed_support_matches_reference_for_every_loss_type(loss_type, level):
    inputs = make_inputs(batch=5, length=6, vocab=43, seed=zlib.crc32(f"{loss_type}-{level}".encode()) % 1000)
    replay = REPLAYS["all_three"]
    mask = replayed_mask(inputs, temperature=OPTIONS["temperature"], **replay)
    compare(inputs, replay, mask, gate="sigmoid", loss_type=loss_type, importance_sampling_level=level, **OPTIONS)


def test_per_row_options_match_reference_with_softcap(layout):
    inputs = make_inputs(batch=4, length=5, vocab=37, seed=21)
    replay = dict(top_k=torch.tensor([0, 3, 40, 7]), top_p=torch.tensor([0.6, 1.0, 0.9, 0.75], dtype=torch.float64),
                  min_p=torch.tensor([0.0, 0.2, 0.05, 0.0], dtype=torch.float64))
    mask = replayed_mask(inputs, temperature=0.9, logit_softcap=2.5, **replay)
    compare(inputs, replay, mask, gate="erf", temperature=0.9, logit_softcap=2.5, entropy_coef=0.02)


def test_float32_replay_matches_reference(layout):
    inputs = make_inputs(batch=5, length=6, vocab=43, seed=33)
    replay = REPLAYS["all_three"]
    mask = replayed_mask(inputs, dtype=torch.float32, temperature=OPTIONS["temperature"], **replay)
    compare(inputs, replay, mask, dtype=torch.float32, gate="softsign", **OPTIONS)


def test_gradient_reaches_only_the_support(layout):
    inputs = make_inputs(batch=3, length=4, vocab=31, seed=4, masked_row=False)
    ours = run_loss(inputs, gate="sigmoid", top_k=2, bias=True)
    mask = replayed_mask(inputs, top_k=2)
    # d loss / d bias is the logits gradient summed over tokens: 0 for a column outside every token's support
    outside = ~(mask & inputs.mask.bool().unsqueeze(2)).any(dim=(0, 1))
    assert outside.any()
    assert torch.all(ours.grads[2][outside] == 0)
    assert torch.all(ours.grads[2][~outside] != 0)


# -- the replay against vLLM's sampler ----------------------------------------------------------------------------


def literal_vllm_support(logits, top_k: int | None, top_p: float | None, min_p: float | None):
    """vLLM v1's order written the way its sampler does it: min-p on the probabilities, then sort ascending, mask
    below the k-th largest, mask where the ascending cumulative probability <= 1 - p except the largest."""
    logits = logits.clone()
    if min_p:
        probs = logits.softmax(-1)
        logits[probs < min_p * probs.amax(-1, keepdim=True)] = -math.inf
    ordered, index = logits.sort(dim=-1, descending=False)
    if top_k:
        kth = ordered.gather(1, (ordered.shape[1] - torch.full((ordered.shape[0], 1), top_k)).clamp(min=0))
        ordered = ordered.masked_fill(ordered < kth, -math.inf)
    if top_p is not None:
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, -math.inf)
    kept = torch.empty_like(ordered, dtype=torch.bool).scatter_(1, index, ordered > -math.inf)
    return kept


CASES = {"top_k_3": (3, None, None), "top_p_0.9": (None, 0.9, None), "min_p_0.1": (None, None, 0.1),
         "k_then_p": (11, 0.6, None), "all": (20, 0.85, 0.02)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_replay_equals_vllm_sort_and_cumsum(case):
    """No ties: the replayed kept sets (returned ids) are vLLM's sets, plus the target where vLLM dropped it."""
    top_k, top_p, min_p = case
    inputs = make_inputs(batch=4, length=9, vocab=61, seed=8, masked_row=False)
    logits = _logits(inputs)
    vllm = literal_vllm_support(logits.reshape(-1, 61), top_k, top_p, min_p).reshape(4, 9, 61)
    with_target = vllm.clone().scatter_(2, inputs.ids.unsqueeze(2), True)
    assert torch.equal(with_target, replayed_mask(inputs, top_k=top_k, top_p=top_p, min_p=min_p))  # the reference
    options = {k: v for k, v in zip(("top_k", "top_p", "min_p"), case, strict=True) if v is not None}
    *_, mass, ids = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, bias=inputs.bias, return_kept_mass=True,
                                   return_kept_ids=61, **options)
    ours = torch.zeros(4, 9, 62, dtype=torch.bool).scatter_(2, torch.where(ids < 0, 61, ids), True)[..., :61]
    assert torch.equal(ours, with_target)
    full = torch.softmax(logits, -1)
    assert torch.allclose(mass, (full * with_target).sum(-1), atol=1e-12, rtol=0)


def _tied_inputs():
    """Logits with ties: every vocabulary row appears twice (tokens 2v and 2v+1 have equal logits)."""
    inputs = make_inputs(batch=3, length=5, vocab=19, seed=12, masked_row=False)
    inputs.weight = inputs.weight.repeat_interleave(2, dim=0)
    inputs.bias = inputs.bias.repeat_interleave(2)
    inputs.ids = inputs.ids * 2
    return inputs


def test_top_k_keeps_every_token_tied_with_the_kth_as_vllm():
    inputs = _tied_inputs()
    logits = _logits(inputs)
    for k in (1, 2, 3, 6):
        vllm = literal_vllm_support(logits.reshape(-1, 38), k, None, None).reshape(3, 5, 38)
        assert torch.all(vllm.sum(-1) == k + k % 2)  # a tie pair straddling the k-th place is kept whole
        *_, ids = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, bias=inputs.bias, top_k=k,
                                 return_kept_ids=38)
        ours = torch.zeros(3, 5, 39, dtype=torch.bool).scatter_(2, torch.where(ids < 0, 38, ids), True)[..., :38]
        assert torch.equal(ours, vllm | torch.zeros_like(vllm).scatter_(2, inputs.ids.unsqueeze(2), True))


@pytest.mark.parametrize("candidates", [1024, 1], ids=["within_candidates", "histograms"])
def test_top_p_keeps_a_tie_group_whole(monkeypatch, candidates):
    monkeypatch.setattr(support_module, "REPLAY_CANDIDATES", candidates)
    monkeypatch.setattr(support_module, "HISTOGRAM_BINS", 3)
    monkeypatch.setattr(support_module, "HISTOGRAM_FINISH", 1)
    inputs = _tied_inputs()
    logits = _logits(inputs).reshape(-1, 38)
    *_, ids = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, bias=inputs.bias, top_p=0.5,
                             return_kept_ids=38)
    ours = torch.zeros(15, 39, dtype=torch.bool).scatter_(1, torch.where(ids < 0, 38, ids).reshape(15, 38),
                                                           True)[:, :38]
    sampler = reference_sampler_support(logits, top_p=torch.full((15,), 0.5, dtype=torch.float64))
    assert torch.equal(sampler[:, 0::2], sampler[:, 1::2])  # tie pairs together
    assert torch.equal(ours, sampler.clone().scatter_(1, inputs.ids.reshape(15, 1), True))
    # vLLM's sort may split a pair at the boundary; what it keeps is always within this support
    assert torch.all(literal_vllm_support(logits, None, 0.5, None) <= sampler)


# -- no-op options ------------------------------------------------------------------------------------------------

NOOPS = {"top_k_above_V": dict(top_k=1000), "top_k_0": dict(top_k=0), "top_p_1": dict(top_p=1.0),
         "min_p_0": dict(min_p=0.0), "per_row": dict(top_k=torch.tensor([0, 99, 37, 50]),
                                                     top_p=torch.ones(4, dtype=torch.float64))}


@pytest.mark.parametrize("noop", NOOPS.values(), ids=NOOPS.keys())
def test_noop_options_are_bitwise_the_full_vocabulary(noop):
    inputs = make_inputs(vocab=37, seed=2)
    full = run_loss(inputs, dtype=torch.float32, gate="erf", **OPTIONS)
    same = run_loss(inputs, dtype=torch.float32, gate="erf", **OPTIONS, **noop)
    for name in ("loss", "logprobs", "entropy", "ratio"):
        assert torch.equal(getattr(full.out, name), getattr(same.out, name)), name
    for got, want in zip(same.grads, full.grads, strict=True):
        assert torch.equal(got, want)
    assert same.out.kept_mass is None and full.out.kept_mass is None
    logp, entropy, mass = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, inputs.mask, bias=inputs.bias,
                                         return_kept_mass=True, **noop)
    logp_full, entropy_full = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, inputs.mask, bias=inputs.bias)
    assert torch.equal(logp, logp_full) and torch.equal(entropy, entropy_full)
    assert torch.all(mass[inputs.mask.bool()] == 1)


# -- bounds of the replay ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("candidates", [1, 3, 8], ids=lambda c: f"{c}_candidates")
@pytest.mark.parametrize("replay", [dict(top_p=0.9), dict(top_p=0.8, min_p=0.02), dict(top_p=0.95, top_k=12)],
                         ids=["top_p", "with_min_p_floor", "with_top_k_floor"])
@pytest.mark.parametrize("bins", [(2048, 512), (2, 1)], ids=["one_level", "levels_to_one_token"])
def test_top_p_beyond_the_candidates_is_exact(monkeypatch, candidates, replay, bins):
    """Supports larger than the candidates take the histograms (and the floor's masked pass): one level, or many
    two-bin levels down to single tokens."""
    monkeypatch.setattr(support_module, "REPLAY_CANDIDATES", candidates)
    monkeypatch.setattr(support_module, "HISTOGRAM_BINS", bins[0])
    monkeypatch.setattr(support_module, "HISTOGRAM_FINISH", bins[1])
    monkeypatch.setattr(support_module, "HISTOGRAM_LEVELS", 40)
    inputs = make_inputs(batch=4, length=6, vocab=41, seed=15)
    mask = replayed_mask(inputs, **replay)
    assert (mask.sum(-1) > candidates).any()
    compare(inputs, replay, mask, gate="arctan", memory_budget_mb=0.002)


def test_returned_kept_sets_reproduce_the_replay(layout):
    """Replayed once (the old policy's pass), then renormalised over the same sets in the loss."""
    inputs = make_inputs(batch=4, length=6, vocab=41, seed=17)
    replay = dict(top_p=0.85, top_k=15)
    logp, _, ids = token_logprobs(inputs.hidden, inputs.weight, inputs.ids, inputs.mask, bias=inputs.bias,
                                  return_kept_ids=16, **replay)
    assert ids.shape == (4, 6, 16) and torch.all(ids[~inputs.mask.bool()] == -1)
    replayed = run_loss(inputs, gate="sigmoid", **replay)
    given = run_loss(inputs, gate="sigmoid", kept_token_ids=ids)
    mask = inputs.mask.bool()
    assert max_abs(replayed.out.logprobs, given.out.logprobs) < 1e-12
    assert max_abs(replayed.out.logprobs[mask], logp[mask]) < 1e-12
    for got, want in zip(given.grads, replayed.grads, strict=True):
        assert max_abs(got, want) < 1e-12


def test_returning_more_kept_ids_than_the_bound_raises():
    inputs = make_inputs(vocab=41, seed=3)
    with pytest.raises(ValueError, match="return_kept_ids: a replayed support holds"):
        token_logprobs(inputs.hidden, inputs.weight, inputs.ids, bias=inputs.bias, top_p=0.99, return_kept_ids=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_backends_run_the_support(backend, layout):
    """The Triton backend routes a call with a support to the shared buffer path (interpreted here)."""
    inputs = make_inputs(batch=3, length=5, vocab=37, seed=9)
    replay = dict(top_p=0.8)
    mask = replayed_mask(inputs, dtype=torch.float32, **replay)
    compare(inputs, replay, mask, dtype=torch.float32, backend=backend, gate="sigmoid")


# -- bad inputs ----------------------------------------------------------------------------------------------------

BAD = {
    "kept_id_above_V": (dict(kept_token_ids="above"), "kept_token_ids: ids must lie in"),
    "kept_id_below_minus_one": (dict(kept_token_ids="below"), "kept_token_ids: ids must lie in"),
    "target_outside_its_set": (dict(kept_token_ids="missing"), "not in their own kept set"),
    "empty_kept_sets": (dict(kept_token_ids="empty"), "kept_token_ids: K = 0"),
    "float_kept_ids": (dict(kept_token_ids="float"), "kept_token_ids: expected an integer"),
    "kept_ids_shape": (dict(kept_token_ids="shape"), r"kept_token_ids: expected shape \[4, 7, K\]"),
    "kept_and_replay": (dict(kept_token_ids="ok", top_p=0.9), "kept_token_ids: give the kept sets or replay"),
    "top_p_zero": (dict(top_p=0.0), r"top_p: must be in \(0, 1\]"),
    "top_p_above_one": (dict(top_p=1.5), r"top_p: must be in"),
    "top_p_row_above_one": (dict(top_p=torch.tensor([0.5, 1.2, 1.0, 0.9], dtype=torch.float64)),
                            r"top_p: every row's value must be in \(0, 1\]"),
    "negative_top_k": (dict(top_k=-1), "top_k: must be"),
    "negative_top_k_row": (dict(top_k=torch.tensor([1, -2, 3, 4])), "top_k: every row's value"),
    "float_top_k": (dict(top_k=2.5), "top_k: expected an int"),
    "min_p_negative": (dict(min_p=-0.1), r"min_p: must be in \[0, 1\]"),
    "min_p_above_one": (dict(min_p=1.1), "min_p: must be"),
    "top_p_rows_shape": (dict(top_p=torch.ones(3, dtype=torch.float64)), r"top_p: expected a number or a tensor"),
}


def _bad_kept(kind: str, inputs):
    ids = kept_ids_of(torch.zeros(4, 7, 37, dtype=torch.bool).scatter_(2, inputs.ids.unsqueeze(2), True), pad_to=3)
    if kind == "above":
        ids[0, 0, 1] = 37
    elif kind == "below":
        ids[0, 0, 1] = -2
    elif kind == "missing":
        ids[0, 0] = torch.tensor([(int(inputs.ids[0, 0]) + 1) % 37, -1, -1])
    elif kind == "empty":
        ids = ids[..., :0]
    elif kind == "float":
        ids = ids.double()
    elif kind == "shape":
        ids = ids[:, :5]
    return ids


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_support_inputs_are_named(bad):
    options, message = bad
    inputs = make_inputs(vocab=37, seed=6)
    options = dict(options)
    if isinstance(options.get("kept_token_ids"), str):
        options["kept_token_ids"] = _bad_kept(options["kept_token_ids"], inputs)
    with pytest.raises((ValueError, TypeError), match=message):
        gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask, **options)
    with pytest.raises((ValueError, TypeError), match=message):
        token_logprobs(inputs.hidden, inputs.weight, inputs.ids, inputs.mask, **options)


def test_a_triton_statistics_kernel_is_refused_with_a_support():
    inputs = make_inputs(vocab=37, seed=6)
    with pytest.raises(ValueError, match="statistics_method: 'dot' selects a Triton no-grad kernel"):
        token_logprobs(inputs.hidden.float(), inputs.weight.float(), inputs.ids, backend="triton", top_p=0.5,
                       statistics_method="dot")


def test_return_kept_ids_needs_a_replay():
    inputs = make_inputs(vocab=37, seed=6)
    with pytest.raises(ValueError, match="return_kept_ids: returns the replayed kept sets"):
        token_logprobs(inputs.hidden, inputs.weight, inputs.ids, return_kept_ids=4)


def test_masked_positions_need_no_valid_kept_set():
    inputs = make_inputs(vocab=37, seed=6)
    mask = torch.zeros(4, 7, 37, dtype=torch.bool).scatter_(2, inputs.ids.unsqueeze(2), True)
    ids = kept_ids_of(mask, pad_to=2)
    ids[~inputs.mask.bool()] = 99  # garbage where the mask is off
    out = gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask,
                            kept_token_ids=ids)
    # a one-token support: log-prob 0, entropy 0, and no gradient
    valid = inputs.mask.bool()
    assert torch.all(out.logprobs[valid] == 0) and torch.all(out.entropy[valid] == 0)


def test_a_support_far_below_the_largest_logit_stays_finite(layout):
    """Kept sets of the least likely tokens, 100+ nats below the largest logit (float32 exp overflows there)."""
    inputs = make_inputs(batch=3, length=4, vocab=23, seed=19, masked_row=False)
    inputs.weight = inputs.weight * 60
    logits = _logits(inputs, torch.float32)
    order = logits.argsort(-1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(2, order[..., :3], True)
    inputs.ids = order[..., 0]
    assert ((logits.amax(-1) - logits.gather(2, order[..., 2:3]).squeeze(-1)) > 100).all()
    ours, _ = compare(inputs, {"kept_token_ids": kept_ids_of(mask)}, mask, dtype=torch.float32, gate="sigmoid",
                      tolerance=TOLERANCES[torch.float32])
    assert all(torch.isfinite(g).all() for g in ours.grads)
