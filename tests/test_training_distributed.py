"""Distributed training on existing engines: the shipped Accelerate configs (DDP, FSDP2, DeepSpeed ZeRO) and FSDP2
on the AFT model with two CPU processes (gloo). The DDP run of the training script itself is in test_scripts.py.

accelerate 1.15 applies FSDP only on accelerators (with ACCELERATE_USE_CPU its CPU processes run DDP), so on CPU
the FSDP2 test drives torch's `fully_shard` the way fsdp.yaml configures it: one shard group per AFTBlock (the
model's `_no_split_modules`), the embeddings, final norm and tied LM head in the root group.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "scripts" / "accelerate_configs"

TINY = dict(  # noqa: C408
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    intermediate_size=32,
    max_position_embeddings=16,
    aft_variant="local",
    local_window_size=3,
    position_bias_rank=4,
)


def test_shipped_accelerate_configs_name_the_aft_block():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from aft import AFTConfig, AFTForCausalLM

    kinds = {p.stem: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert sorted(kinds) == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    assert kinds["ddp"].distributed_type == DistributedType.MULTI_GPU
    assert [kinds[f"deepspeed_zero{s}"].deepspeed_config["zero_stage"] for s in (2, 3)] == [2, 3]
    fsdp = kinds["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    model = AFTForCausalLM(AFTConfig(**TINY))
    wrap = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert {wrap} == set(model._no_split_modules) == {"AFTBlock"}
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=fsdp.fsdp_config["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[wrap],
    )
    plugin.set_auto_wrap_policy(model)  # raises when the class is not in the model
    assert {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"AFTBlock"}


DRIVER = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from aft import AFTConfig, AFTForCausalLM

def train(model, batches, rank, world):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for ids in batches:  # (4, T): each process takes its share of the global batch
        share = ids.chunk(world)[rank]
        loss = model(input_ids=share, labels=share, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = AFTConfig(**json.loads(sys.argv[1]))
generator = torch.Generator().manual_seed(1)
batches = [torch.randint(0, config.vocab_size, (4, 12), generator=generator) for _ in range(3)]
torch.manual_seed(0)
model = AFTForCausalLM(config)
reference = AFTForCausalLM(config)
reference.load_state_dict(model.state_dict())
for block in model.modules():
    if type(block).__name__ in model._no_split_modules:
        fully_shard(block)
fully_shard(model)
losses = train(model, batches, rank, world)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    expected = train(reference, batches, 0, 1)
    weights = reference.state_dict()
    diff = max((full[k].float() - weights[k].float()).abs().max().item() for k in weights)
    sharded = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
    json.dump({"losses": losses, "expected": expected, "weight_diff": diff, "keys": sorted(full) == sorted(weights),
               "sharded": sharded, "parameters": len(list(model.parameters()))}, open(sys.argv[2], "w"))
dist.barrier()  # no rank tears gloo down while another still has work in flight (a SIGABRT at exit otherwise)
dist.destroy_process_group()
"""


def test_fsdp2_on_aft_blocks_trains_like_one_process(tmp_path):
    """Two gloo processes, FSDP2 over AFTBlock: the same losses and weights as one process on the whole batch."""
    driver = tmp_path / "fsdp_driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "fsdp.json"
    package_root = tmp_path / "pkg"
    package_root.mkdir()
    (package_root / "aft").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(package_root), OMP_NUM_THREADS="1")
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = subprocess.run(
        [sys.executable, *launch, str(driver), json.dumps(TINY), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(out.read_text())
    assert run["sharded"] == run["parameters"] > 0  # every parameter is a DTensor shard
    assert run["losses"] == pytest.approx(run["expected"], rel=1e-5)
    assert run["keys"] and run["weight_diff"] < 1e-5  # Adam steps of 1e-3: the sums differ only in order
