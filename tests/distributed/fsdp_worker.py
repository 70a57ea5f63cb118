"""One rank of the FSDP check: GatedGRPOTrainer's loss and reference pass on FSDP-wrapped models, CPU (gloo).

Run with ``python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py MODEL_DIR OUT``. For FSDP1 and FSDP2, the
trainer installs its fused head while it builds the models; they are then wrapped with torch's FSDP (decoder
layers as units, the lm_head in the root unit or as a unit of its own) the way accelerate wraps them on GPUs. Per
layout and ``beta`` in (0, 0.2): the reference model's log-probs (TRL's no-grad pass through the wrapped reference
model, when beta != 0), the loss of ``trainer._compute_loss`` on this rank's half of the batch, the full gradient of
every parameter after backward and the logged metrics. Rank 0 writes them to ``OUT`` (torch.save).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_batch import LOGGED, fixed_batch, make_trainer, reference_logps, rows_of


def wrap_fsdp1(model: torch.nn.Module, layer_class: type, head_unit: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    head = model.lm_head

    def is_unit(module: torch.nn.Module) -> bool:
        return isinstance(module, layer_class) or (head_unit and module is head)

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True,
                                    auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=is_unit))


def wrap_fsdp2(model: torch.nn.Module, layer_class: type, head_unit: bool) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, layer_class):
            fully_shard(module, mesh=mesh)
    if head_unit:
        fully_shard(model.lm_head, mesh=mesh)  # its weight stays a sharded DTensor outside its own forward
    return fully_shard(model, mesh=mesh)


def full_gradients(model: torch.nn.Module, version: int) -> dict[str, torch.Tensor]:
    if version == 2:
        return {name.replace("_fsdp_wrapped_module.", ""): p.grad.full_tensor().clone()
                for name, p in model.named_parameters() if p.grad is not None}
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        return {name.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                for name, p in model.named_parameters() if p.grad is not None}


def main(model_dir: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for version, beta, head_unit in itertools.product((1, 2), (0.0, 0.2), (False, True)):
        wrap = wrap_fsdp1 if version == 1 else wrap_fsdp2
        trainer = make_trainer(model_dir, os.path.join(os.path.dirname(out_path), f"run-{rank}"), beta=beta,
                               world=world)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        layer_class = type(trainer.model.model.layers[0])
        batch = fixed_batch(trainer.model)
        inputs = rows_of(batch, rank, world)
        ref_logps = None
        if beta != 0.0:
            ref_model = wrap(trainer.ref_model, layer_class, head_unit)
            ref_logps = reference_logps(trainer, ref_model, inputs)
            inputs["ref_per_token_logps"] = ref_logps
            full_ref = [torch.zeros_like(ref_logps) for _ in range(world)]
            dist.all_gather(full_ref, ref_logps)
            ref_logps = torch.cat(full_ref)
        policy = wrap(trainer.model, layer_class, head_unit)
        head_is_dtensor = isinstance(trainer.model.lm_head.weight, DTensor)  # sharded outside its forward
        loss = trainer._compute_loss(policy, inputs)
        loss.backward()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach().reshape(()))
        metrics = {key: trainer._metrics["train"][key][-1] for key in LOGGED if key in trainer._metrics["train"]}
        results[(version, beta, head_unit)] = {
            "grads": full_gradients(policy, version), "metrics": metrics, "head_is_dtensor": head_is_dtensor,
            "loss": torch.stack(losses).mean(), "ref_logps": ref_logps,
        }
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
