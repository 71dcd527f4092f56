"""Expert parallelism over ``torch.distributed``: experts sharded across ranks, tokens moved by all-to-all."""
from moemix.parallel.all_to_all import all_to_all, exchange_counts
from moemix.parallel.convert import distribute_experts
from moemix.parallel.ddp import exclude_expert_params_from_ddp, named_expert_parameters
from moemix.parallel.expert_parallel import ExpertParallelMoE
from moemix.parallel.sharded_experts import ShardedExperts, shard_experts

__all__ = [
    "ShardedExperts", "shard_experts", "ExpertParallelMoE", "distribute_experts",
    "exclude_expert_params_from_ddp", "named_expert_parameters",
    "all_to_all", "exchange_counts",
]
