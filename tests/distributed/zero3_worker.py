"""One rank of the ZeRO-3 check: the fused loss inside a DeepSpeed ZeRO-3 engine's forward, run as the lm_head's own
call (the engine's hooks gather the weight and reduce its gradient), on CPU (gloo).

Run with ``python -m torch.distributed.run --nproc_per_node 2 zero3_worker.py OUT``; rank 0 writes the full
gradients of every parameter (``safe_get_full_grad``) and the mean loss to ``OUT`` (torch.save).
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from zero3_model import batch_for_rank, loss_options, tiny_causal_lm

from fused_gates import gated_policy_loss
from fused_gates.integrations.trl.fused_head import LogitTransform, add_gated_head


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_causal_lm()
    add_gated_head(model, LogitTransform(temperature=1.0))  # before the engine wraps it, as the trainer does
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids, attention, advantages, old, keep = batch_for_rank(rank, world)

    def head(hidden, weight, bias):
        # runs as the lm_head's forward: the engine's hooks have gathered the weight
        assert weight.numel() > 0, "the lm_head weight was not gathered"
        out = gated_policy_loss(hidden[:, -keep - 1 : -1], weight, ids[:, -keep:], advantages, attention[:, -keep:],
                                old, **loss_options())
        return out.loss

    loss = engine(input_ids=ids, attention_mask=attention, fused_gates_head=head)["head"]
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().reshape(()))
    if rank == 0:
        torch.save({"grads": {k: v.clone() for k, v in grads.items() if v is not None},
                    "loss": torch.stack(losses).mean()}, out_path)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
