"""The cost of the sampler's support against the full-vocabulary training step, at Qwen2.5-0.5B's head on CPU.

    python benchmarks/sampler_support.py [--batch 8] [--rounds 3] [--out benchmarks/results/sampler-support-cpu]

Rows (float32, N = B x 256 tokens, the last 1/8 of each row padding, the benchmark inputs of ``head_impls.make_case``),
each a training step (loss + backward into hidden and weight) or a no-grad log-prob pass:

* ``full``: :func:`fused_gates.gated_policy_loss` over the whole vocabulary (the reference row of the ratios);
* ``kept_sets_64``: the loss over given kept sets of 64 ids per token (the support held as columns);
* ``top_k_50``, ``top_p_0.9``, ``min_p_0.05+top_p_0.95``: the support replayed on the trainer's logits;
* forward: ``token_logprobs`` over the whole vocabulary, with ``top_p=0.9`` returning the kept mass, and with
  ``top_k=50`` returning the kept sets (at most 64 ids a token).

Two logit spreads: ``flat`` (the benchmark's weights, std ~0.6: top-p sets far beyond the 1,024 candidates, the mask
layout and the histogram cut) and ``peaked`` (weights x 8, std ~5: top-p sets within the candidates, the column
layout). The rounds interleave the rows (the machine is shared: the median and the fastest round of each row, and
the ratios of each to the full row's). Every row's loss is checked against a float32 materialised reference over the
same support (vLLM's sort-and-cumsum semantics written here) before it counts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from head_impls import make_case, policy_loss  # noqa: E402

from fused_gates import gated_policy_loss, token_logprobs  # noqa: E402

H, V = 896, 151_936
TRAINING_ROWS = {
    "full": {},
    "kept_sets_64": "kept",
    "top_k_50": {"top_k": 50},
    "top_p_0.9": {"top_p": 0.9},
    "min_p_0.05+top_p_0.95": {"min_p": 0.05, "top_p": 0.95},
}
FORWARD_ROWS = {"full": {}, "top_p_0.9+kept_mass": {"top_p": 0.9, "return_kept_mass": True},
                "top_k_50+kept_ids": {"top_k": 50, "return_kept_ids": 64}}


def kept_sets(case, count: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    kept = torch.randint(0, V, (*case.ids.shape, count), generator=g)
    kept[..., 0] = case.ids
    return kept


@torch.no_grad()
def reference_supported_logprobs(case, options: dict, kept: torch.Tensor | None) -> torch.Tensor:
    """Float32 log-probs over the support, materialised in blocks of rows; the replay as vLLM's sampler writes it."""
    b, t, _ = case.hidden.shape
    x = case.hidden.detach().reshape(b * t, H)
    ids = case.ids.reshape(-1)
    valid = case.mask.reshape(-1).bool()
    out = torch.zeros(b * t)
    for start in range(0, b * t, 128):
        rows = slice(start, min(start + 128, b * t))
        z = x[rows] @ case.weight.detach().T
        if kept is not None:
            keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, kept.reshape(b * t, -1)[rows], True)
        else:
            masked = z.clone()
            if options.get("min_p"):
                probs = masked.softmax(-1)
                masked[probs < options["min_p"] * probs.amax(-1, keepdim=True)] = -math.inf
            ordered, index = masked.sort(dim=-1)
            if options.get("top_k"):
                ordered[ordered < ordered[:, -options["top_k"]].unsqueeze(1)] = -math.inf
            if options.get("top_p"):
                drop = ordered.softmax(-1).cumsum(-1) <= 1 - options["top_p"]
                drop[:, -1] = False
                ordered[drop] = -math.inf
            keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, index, ordered > -math.inf)
            keep.scatter_(1, ids[rows].unsqueeze(1), True)  # the drawn token is kept
        z = z.masked_fill(~keep, -math.inf)
        out[rows] = z.gather(1, ids[rows].unsqueeze(1)).squeeze(1) - z.logsumexp(1)
    return torch.where(valid, out, torch.zeros(())).view(b, t)


def training_step(case, options: dict):
    h = case.hidden.detach().requires_grad_()
    w = case.weight.detach().requires_grad_()
    out = gated_policy_loss(h, w, case.ids, case.advantages, case.mask, case.old, gate="sigmoid", **options)
    out.loss.backward()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spreads", default="flat,peaked")
    parser.add_argument("--out", default=str(HERE / "results" / "sampler-support-cpu"))
    args = parser.parse_args()
    rows = []
    for spread in args.spreads.split(","):
        case = make_case(args.batch, 256, H, V)
        if spread == "peaked":
            case.weight = (case.weight.detach() * 8).requires_grad_()
        kept = kept_sets(case)
        options = {name: ({"kept_token_ids": kept} if value == "kept" else value)
                   for name, value in TRAINING_ROWS.items()}
        times: dict[tuple[str, str], list[float]] = {}
        checks: dict[tuple[str, str], dict] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up (and checks)
            for name, row in options.items():
                start = time.perf_counter()
                out = training_step(case, row)
                elapsed = time.perf_counter() - start
                if round_ == 0:
                    reference = reference_supported_logprobs(case, TRAINING_ROWS[name] if name != "kept_sets_64"
                                                             else {}, kept if name == "kept_sets_64" else None)
                    expected = policy_loss(reference, case).item()
                    error = abs(out.loss.item() - expected)
                    if not error <= 1e-4 * max(1.0, abs(expected)):
                        raise SystemExit(f"{spread} {name}: loss {out.loss.item():.8f}, reference over the support "
                                         f"{expected:.8f}")
                    mass = None if out.kept_mass is None else float(out.kept_mass[case.mask.bool()].mean())
                    checks[("fwd_bwd", name)] = {"loss": out.loss.item(), "reference": expected, "error": error,
                                                 "kept_mass_mean": mass}
                else:
                    times.setdefault(("fwd_bwd", name), []).append(elapsed)
            for name, row in FORWARD_ROWS.items():
                start = time.perf_counter()
                token_logprobs(case.hidden.detach(), case.weight.detach(), case.ids, case.mask, **row)
                elapsed = time.perf_counter() - start
                if round_:
                    times.setdefault(("forward", name), []).append(elapsed)
            print(f"{spread}: round {round_} done", flush=True)
        for (mode, name), values in times.items():
            median, fastest = statistics.median(values), min(values)
            full = times[(mode, "full")]
            rows.append({"spread": spread, "mode": mode, "row": name, "median_s": median,
                         "x_full": median / statistics.median(full), "min_s": fastest,
                         "x_full_min": fastest / min(full),
                         "rounds": values, "tokens": case.valid_tokens, **checks.get((mode, name), {})})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"# Sampler's support, Qwen2.5-0.5B head (H = {H}, V = {V:,}), float32 on CPU, "
             f"{torch.get_num_threads()} threads, N = {rows[0]['tokens']} valid tokens; median of {args.rounds} "
             "interleaved rounds (and the fastest round: the least disturbed by other jobs on a shared machine)", "",
             "| spread | mode | row | median | x full | fastest | x full (fastest) | kept mass (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mass = "" if r.get("kept_mass_mean") is None else f"{r['kept_mass_mean']:.4f}"
        lines.append(f"| {r['spread']} | {r['mode']} | {r['row']} | {r['median_s']:.2f} s | {r['x_full']:.2f} | "
                     f"{r['min_s']:.2f} s | {r['x_full_min']:.2f} | {mass} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
