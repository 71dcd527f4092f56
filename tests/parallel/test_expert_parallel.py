"""Sharded experts on 2 gloo processes equal the single-process layer (outputs and gradients): ExpertParallelMoE
against SparseMoE, and MoELayers with their own router or experts sharded by shard_experts.

One spawn runs every case (tests/parallel/_workers.py) and each test below checks one behaviour.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moemix.parallel import ExpertParallelMoE
from tests.parallel._dist import run_distributed
from tests.parallel._workers import CASES, equivalence_worker

WORLD_SIZE = 2
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("expert_parallel")
    run_distributed(equivalence_worker, WORLD_SIZE, str(out_dir), timeout=120)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


cases = pytest.mark.parametrize("case", sorted(CASES))
ranks = pytest.mark.parametrize("rank", range(WORLD_SIZE))


@cases
@ranks
def test_output_equals_single_process(results, case, rank):
    res = results[rank][case]
    assert res["shape_ok"]
    assert res["output"] < TOL


@cases
@ranks
def test_input_gradient_equals_single_process(results, case, rank):
    assert results[rank][case]["input_grad"] < TOL


@cases
@ranks
def test_replicated_gradient_after_ddp_average_equals_mean_loss_gradient(results, case, rank):
    assert results[rank][case]["replicated_grad"] < TOL


@cases
@ranks
def test_local_expert_gradient_equals_scaled_single_process_slice(results, case, rank):
    res = results[rank][case]
    assert res["expert_grad"] < TOL
    assert res["expert_grad_is_none"] == []
    if sum(res["local_tokens_per_expert"]):
        assert res["expert_grad_norm"] > 0  # the comparison is not vacuous


@cases
@ranks
def test_aux_loss_and_routing_statistics_match_single_process(results, case, rank):
    res = results[rank][case]
    assert res["aux_loss"] < TOL
    assert res["tokens_per_expert"] == res["tokens_per_expert_ref"]
    assert res["dropped"][0] == res["dropped"][1]


@cases
def test_local_tokens_per_expert_counts_rows_from_all_ranks(results, case):
    for rank in range(WORLD_SIZE):
        local = results[rank][case]["local_tokens_per_expert"]
        per_rank = [results[r][case]["tokens_per_expert"] for r in range(WORLD_SIZE)]
        width = len(local)
        expected = [sum(counts[rank * width + l] for counts in per_rank) for l in range(width)]
        assert local == expected


def test_skewed_case_sends_no_tokens_to_the_other_rank(results):
    assert results[0]["skewed_routing"]["tokens_per_expert"][2:] == [0, 0]


@pytest.mark.parametrize("case", ["idle_rank", "idle_rank_own_loop", "idle_rank_own_loop_input_without_grad"])
def test_idle_rank_case_gives_rank_1_no_rows(results, case):
    assert results[1][case]["local_tokens_per_expert"] == [0, 0]


def test_empty_rank_case_has_no_tokens_on_rank_1(results):
    assert sum(results[1]["empty_rank"]["tokens_per_expert"]) == 0
    assert sum(results[1]["empty_rank"]["local_tokens_per_expert"]) > 0  # it still serves rank 0


@pytest.mark.parametrize("case", ["glu_shared_capacity", "own_parts_capacity", "forward_routed_only_experts"])
def test_capacity_case_drops_tokens(results, case):
    assert all(results[r][case]["dropped"][0] > 0 for r in range(WORLD_SIZE))


@pytest.mark.parametrize("case, layout", [("sorted_layout", "sorted"), ("padded_layout", "padded"),
                                          ("grouped_mm_experts", "grouped_mm"),
                                          ("forward_routed_only_experts", "sorted")])
@ranks
def test_local_experts_run_the_received_rows_in_the_layers_layout(results, case, layout, rank):
    assert results[rank][case]["local_layouts"] == [layout]


@ranks
def test_own_layers_keep_their_class_and_slice_their_buffers(results, rank):
    for case in ("own_router_and_experts", "own_parts_capacity", "forward_routed_only_experts",
                 "moe_layer_grouped_experts"):
        assert results[rank][case]["type"] == "MoELayer"
        assert results[rank][case]["buffers"] == 0.0
    assert results[rank]["uneven_tokens"]["type"] == "ExpertParallelMoE"


@ranks
def test_ddp_training_matches_single_process_sgd(results, rank):
    res = results[rank]["ddp_training"]
    assert res["replaced"] == 2 and res["again"] == 0
    assert res["types"] == ["Linear", "SparseMoE", "MoELayer", "Linear"]  # sharded in place
    assert res["ignored"] == ["1.experts.local.b1", "1.experts.local.b2", "1.experts.local.w1", "1.experts.local.w2",
                              "2.experts.local.scale", "2.experts.local.weight"]
    assert res["replicated"] < TOL
    assert res["experts"] < TOL


@ranks
def test_constructor_builds_this_ranks_slice_of_the_seeded_sparse_moe(results, rank):
    res = results[rank]["constructor"]
    assert res["local"] == [2 * rank, 2 * rank + 1]
    assert res["w1_shape"] == (2, 8, 32) and res["num_experts"] == 4
    assert res["expert_names"] == ["experts.local.b1", "experts.local.b2", "experts.local.w1", "experts.local.w2"]
    assert res["param_diff"] == 0.0
    assert res["rng_diff"] == 0.0


@pytest.mark.parametrize("check, message", [
    ("indivisible", "ValueError: num_experts (3) must be divisible"),
    ("bad_grad_scale", "ValueError: expert_grad_scale"),
    ("already_parallel", "ValueError: moe must be a SparseMoE"),
    ("bad_splits", "ValueError: output_splits"),
    ("bad_rows", "ValueError: x must have sum(input_splits)=2 rows"),
    ("wrong_last_dim", "ValueError: ExpertParallelMoE expected input of shape [..., 8]"),
    ("shard_twice", "ValueError: layer's experts are sharded already"),
    ("shard_not_a_layer", "ValueError: layer must be a MoELayer, got Linear"),
    ("select_sharded", "ValueError: these experts are sharded already"),
    ("sharded_forward", "RuntimeError: ShardedExperts run through forward_routed"),
    ("local_count", "ValueError: local must hold num_experts / world size = 2 experts, got 4"),
    ("shared_activation_weight", "ValueError: GroupedExperts.select_experts cannot split the parameter act.weight"),
])
def test_bad_arguments_raise_value_errors(results, check, message):
    for rank in range(WORLD_SIZE):
        assert results[rank]["errors"][check].startswith(message)


def test_requires_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(8, 16, num_experts=4)


@ranks
def test_distribute_experts_changes_nothing_when_a_layer_cannot_be_sharded(results, rank):
    res = results[rank]["api"]
    assert res["partial"].startswith("ValueError: cannot shard the experts of 1 (SparseMoE): num_experts (3) must be "
                                     "divisible by the group's world size (2)")
    assert res["partial_untouched"] == ["GroupedExperts", "GroupedExperts"]


@ranks
def test_distribute_experts_shards_the_included_layers_only(results, rank):
    res = results[rank]["api"]
    assert res["include_count"] == 1
    assert res["include_types"] == ["ShardedExperts", "ScaledLinearExperts"]


@ranks
def test_checkpoints_with_the_names_before_experts_local_load(results, rank):
    res = results[rank]["api"]
    assert res["old_names_missing"] == [] and res["old_names_unexpected"] == []
    assert res["old_names_restored"] == 0.0


@ranks
def test_a_shard_refuses_another_ranks_checkpoint(results, rank):
    res = results[rank]["api"]
    if rank == 0:
        assert res["rank0_load"] == res["rank0_load_loose"] == "no error"
    else:  # rank 0's experts 0..1 would silently replace rank 1's experts 2..3
        for message in (res["rank0_load"], res["rank0_load_loose"]):
            assert message.startswith("RuntimeError: Error(s) in loading state_dict")
            assert ("experts._extra_state: the checkpoint's shard holds experts 0..1 of 4 sharded over 2 ranks, this "
                    "rank's shard experts 2..3 of 4 sharded over 2 ranks; its experts were not loaded") in message
        assert "Missing key(s)" in res["rank0_load"] and "experts.local.w1" in res["rank0_load"]
        assert res["rank0_kept"] == 0.0


@ranks
def test_expert_grad_scale_can_be_set_and_is_checked(results, rank):
    res = results[rank]["api"]
    assert res["set_scale"] == 0.25
    assert res["bad_scale"].startswith("ValueError: expert_grad_scale must be a finite number > 0")
    assert res["inf_scale"].startswith("ValueError: expert_grad_scale must be a finite number > 0")


@ranks
def test_bfloat16_autocast_runs_through_the_exchange(results, rank):
    res = results[rank]["api"]
    assert res["bf16_dtype"] == "torch.bfloat16"
    assert res["bf16_diff"] < 1e-2  # bfloat16 rounding of differently grouped GEMMs (about 2e-3 seen)
    assert res["bf16_grad_finite"]
