"""FSDP1 and FSDP2 on CPU (gloo, 2 processes): GatedGRPOTrainer's loss, gradients, metrics and reference-model pass on
FSDP-wrapped models equal one process on the whole batch.

Why not the trainer under accelerate's FSDP: accelerate 1.15 enables FSDP only on accelerator devices. Its
``AcceleratorState`` switches to ``DistributedType.FSDP`` only from a multi-GPU/NPU/XPU/... distributed type, so on
a CPU machine the run is ``MULTI_CPU`` (plain DDP) and the FSDP plugin is dropped; the plugin itself refuses to build
with ``sync_module_states=True`` ("no available devices"). torch's FSDP1 and FSDP2 do run on CPU with gloo, so the
models are wrapped here with torch's APIs as accelerate wraps them (decoder layers as units; the lm_head in the root
unit, or as a unit of its own, whose FSDP2 weight is a sharded DTensor outside its own forward), after the trainer
has installed its head, and the trainer's own ``_compute_loss`` and reference pass run on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the FSDP test")

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))

import trl_fixtures as fixtures  # noqa: E402
from helpers import run_distributed  # noqa: E402
from trainer_batch import LOGGED, fixed_batch, make_trainer, reference_logps  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("fsdp-model") / "dense", "dense")


@pytest.fixture(scope="module")
def single_process(model_dir, tmp_path_factory):
    """The whole batch in one process, per beta: loss, gradients, metrics, reference log-probs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    for beta in (0.0, 0.2):
        trainer = make_trainer(model_dir, str(tmp_path_factory.mktemp("single")), beta=beta, world=1)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = fixed_batch(trainer.model)
        ref_logps = None
        if beta != 0.0:
            ref_logps = batch["ref_per_token_logps"] = reference_logps(trainer, trainer.ref_model, batch)
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        results[beta] = {"loss": loss.detach(), "ref_logps": ref_logps,
                         "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
                         "metrics": {k: trainer._metrics["train"][k][-1] for k in LOGGED
                                     if k in trainer._metrics["train"]}}
    torch.set_num_threads(threads)
    return results


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    """Both FSDP versions, each layout and beta, in one launch of 2 processes."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.pt"
    result = run_distributed(2, [str(HERE / "fsdp_worker.py"), model_dir, str(out)],
                             env={"TRL_EXPERIMENTAL_SILENCE": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("head_unit", [False, True], ids=["head_in_root_unit", "head_own_unit"])
@pytest.mark.parametrize("beta", [0.0, 0.2], ids=["no_reference_model", "reference_model"])
@pytest.mark.parametrize("version", [1, 2], ids=["fsdp1", "fsdp2"])
def test_two_fsdp_processes_match_one_process(version, beta, head_unit, two_processes, single_process):
    got, expected = two_processes[(version, beta, head_unit)], single_process[beta]
    assert got["head_is_dtensor"] == (version == 2), "FSDP2 keeps sharded weights as DTensors"
    if beta != 0.0:
        assert torch.allclose(got["ref_logps"], expected["ref_logps"], atol=1e-5)
    assert got["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-5)
    assert set(got["grads"]) == set(expected["grads"])
    for name, grad in expected["grads"].items():
        scale = grad.abs().max().item()
        error = (got["grads"][name] - grad).abs().max().item()
        assert error <= 1e-5 * scale + 1e-8, f"{name} gradient off by {error:.3g} (max {scale:.3g})"
    assert got["metrics"].keys() == expected["metrics"].keys()
    for key, value in expected["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert expected["metrics"]["clip_ratio/region_mean"] > 0, "the batch exercises clipping"


def test_shipped_fsdp2_config_selects_fsdp2():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(Path(__file__).parent.parent / "integrations/accelerate/fsdp2.yaml"))
    assert config.distributed_type == "FSDP"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
