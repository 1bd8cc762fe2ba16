"""Expert load balancing (runtime.balance): placement, planning, prediction, the balanced layer, and migration
on real ranks: lossless, all or nothing, no recompile."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch._dynamo.utils import counters

import moe_ascend.kernels as ops
from moe_ascend.runtime import MoELayer
from moe_ascend.runtime.balance import (BestRecent, ExpertBalancer, Placement, PlacementError, greedy_placement,
                                        imbalance, migrate, plan_placement, prediction_error)
from moe_ascend.runtime.balance.balancer import _replica_rows, spanning_replicas
from moe_ascend.runtime.balance.migrate import slot_bytes
from moe_ascend.runtime.balance.placement import physical_slots
from moe_ascend.runtime.balance.planner import moved_experts

D, F, E, K = 8, 16, 4, 2


def zipf_load(experts, seed, s=1.2):
    ranks = torch.randperm(experts, generator=torch.Generator().manual_seed(seed)) + 1
    return (1e4 / ranks.double() ** s).round()


# --- placement ---------------------------------------------------------------------------------

def test_initial_placement_puts_each_ranks_replicas_on_its_own_experts():
    placement = Placement.initial(8, 2, redundant=2)
    assert placement.slot_experts == (0, 1, 2, 3, 0, 4, 5, 6, 7, 4)
    slots, count = placement.tables()
    assert slots[0].tolist() == [0, 4, 0] and count.tolist() == [2, 1, 1, 1, 2, 1, 1, 1]
    assert Placement.from_tables(slots, count, 2) == placement


def test_placements_that_cannot_hold_the_experts_say_what_to_change():
    with pytest.raises(PlacementError, match="split evenly"):
        Placement.initial(8, 2, redundant=1)
    with pytest.raises(PlacementError, match="experts without a slot: \\[3\\]"):
        Placement((0, 1, 2, 2), 4, 2)


def test_an_experts_pairs_go_to_its_replicas_in_turn_whichever_choice_they_are():
    slots, count = Placement((0, 1, 2, 3, 0, 1), 4, 2).tables()  # experts 0 and 1 have two replicas
    expert_ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])  # expert 0 always the first choice
    assert physical_slots(expert_ids, slots, count).tolist() == [[0, 1], [4, 2], [0, 5], [4, 3]]


def test_a_rank_routes_to_the_replicas_on_itself_else_on_its_node_else_to_all():
    placement = Placement((0, 1, 2, 0, 3, 1, 2, 3), 4, 4)  # 2 slots a rank, ranks 0-1 on node 0, 2-3 on node 1
    node_of = [0, 0, 1, 1]
    assert [placement.nearest_replicas(e, 0, node_of) for e in range(4)] == [[0], [1], [2], [4, 7]]
    slots, count = placement.tables(rank=0, node_of=node_of)
    assert count.tolist() == [1, 1, 1, 2] and slots[3, :2].tolist() == [4, 7]
    assert placement.tables()[1].tolist() == [2, 2, 2, 2]


def test_only_experts_with_replicas_on_several_ranks_have_their_gradients_summed_across_ranks():
    # expert 1 on both ranks: its row crosses ranks (first); expert 0's two copies on rank 0 are summed there alone
    placement = Placement((0, 0, 1, 2, 3, 1), 4, 2)
    assert _replica_rows(placement, 0) == (2, 1, [(0, 1), (1, 1), (2, 0)])
    assert _replica_rows(placement, 1) == (1, 1, [(2, 0)])
    assert spanning_replicas(placement) == 1
    assert spanning_replicas(Placement.initial(8, 2, redundant=2)) == 0  # each rank copies its own experts


# --- planning and prediction -------------------------------------------------------------------

@pytest.mark.parametrize("experts, ranks, per_node, redundant", [(8, 2, 1, 2), (64, 16, 8, 16), (256, 32, 8, 32)])
def test_our_plan_is_at_least_as_balanced_as_eplb_greedy_and_moves_fewer_experts(experts, ranks, per_node, redundant):
    for seed in range(3):
        load, current = zipf_load(experts, seed), Placement.initial(experts, ranks, redundant)
        eplb, ours = greedy_placement(load, experts + redundant, ranks, per_node), plan_placement(load, current)
        for placement in (eplb, ours):
            for rank in range(ranks):  # two replicas of one expert on one rank would balance nothing
                held = placement.slot_experts[rank * placement.slots_per_rank:(rank + 1) * placement.slots_per_rank]
                assert len(set(held)) == len(held)
        assert imbalance(ours, load) <= imbalance(eplb, load) + 1e-9
        assert imbalance(ours, load) < imbalance(current, load)
        assert moved_experts(current, ours) <= moved_experts(current, eplb)


def test_the_trend_model_follows_a_drifting_load_better_than_the_ema():
    steps = torch.arange(40, dtype=torch.float64)[:, None]
    drifting = torch.cat([100 + 5 * steps, 300 - 5 * steps], dim=1)
    assert prediction_error(drifting, "trend") < 0.5 * prediction_error(drifting, "ema")
    constant = torch.full((40, 2), 50.0)
    assert prediction_error(constant, "ema") == prediction_error(constant, "trend") == 0


def test_the_best_recent_forecast_follows_a_drift_by_its_trend_and_noise_by_its_average():
    steps = torch.arange(40, dtype=torch.float64)[:, None]
    drifting = torch.cat([100 + 5 * steps, 300 - 5 * steps], dim=1)
    noisy = (100 + 30 * torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(0)
    for trace, expected in ((drifting, "trend"), (noisy, "ema")):
        predictor = BestRecent()
        for window in trace:
            predictor.update(window)
        assert predictor.chosen == expected
        assert torch.equal(predictor.predict(4), predictor.candidates[expected].predict(4))
        best, *others = (prediction_error(trace, name, 4) for name in ("best", "ema", "trend"))
        assert best <= 1.1 * min(others)
        restored = BestRecent()  # from a checkpoint: the same scores, the same forecast
        restored.load_state_dict(predictor.state_dict())
        assert restored.chosen == expected and torch.equal(restored.predict(4), predictor.predict(4))


# --- the balanced layer ------------------------------------------------------------------------

def logical_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, E, generator=g).t().contiguous(), torch.randn(E, D, 2 * F, generator=g) / D**0.5,
            torch.randn(E, F, D, generator=g) / F**0.5)


def load_placement(layer, placement: Placement, rank: int, weights) -> None:
    """Give ``layer`` the logical experts ``weights`` laid out by ``placement`` (this rank's slots)."""
    gate, gate_up, down = weights
    mine = placement.slot_experts[rank * placement.slots_per_rank:(rank + 1) * placement.slots_per_rank]
    with torch.no_grad():
        layer.gate.weight.copy_(gate)
        layer.w_gate_up.copy_(gate_up[list(mine)])
        layer.w_down.copy_(down[list(mine)])
    layer.place(placement)


@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_a_balanced_layer_with_replicas_computes_what_the_plain_layer_does(capacity_factor):
    weights = logical_weights()
    plain = MoELayer(D, F, E, K, capacity_factor=capacity_factor)
    balanced = MoELayer(D, F, E, K, capacity_factor=capacity_factor, balance=True, redundant_experts=2)
    with torch.no_grad():
        plain.gate.weight.copy_(weights[0]), plain.w_gate_up.copy_(weights[1]), plain.w_down.copy_(weights[2])
    load_placement(balanced, Placement((3, 0, 1, 2, 3, 0), E, 1), 0, weights)
    x = torch.randn(12, D)
    torch.testing.assert_close(balanced(x), plain(x))
    assert balanced.expert_load.sum() == 12 * K
    optimizer = torch.optim.SGD(balanced.parameters(), lr=0.0)
    ExpertBalancer(balanced, optimizer, interval=10**9)  # sums the replicas' gradients before the step
    for _ in range(2):  # accumulated over two backwards: the replicas are summed once, at the step
        plain(x).square().sum().backward()
        balanced(x).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(balanced.w_down.grad, plain.w_down.grad[[3, 0, 1, 2, 3, 0]])
    torch.testing.assert_close(balanced.w_gate_up.grad, plain.w_gate_up.grad[[3, 0, 1, 2, 3, 0]])


def test_a_balanced_layer_starts_as_the_plain_layer_and_draws_what_it_draws():
    # capacity 3.0 holds every pair, so nothing drops in either layer
    torch.manual_seed(0)
    plain, drawn_after_plain = MoELayer(D, F, E, K, capacity_factor=3.0), torch.randn(3)
    torch.manual_seed(0)
    balanced = MoELayer(D, F, E, K, capacity_factor=3.0, balance=True, redundant_experts=2)
    assert torch.equal(torch.randn(3), drawn_after_plain)  # the modules built after it start alike too
    assert Placement.initial(E, 1, 2).slot_experts == (0, 1, 2, 3, 0, 1)
    assert torch.equal(balanced.w_gate_up, plain.w_gate_up[[0, 1, 2, 3, 0, 1]])
    assert torch.equal(balanced.w_down, plain.w_down[[0, 1, 2, 3, 0, 1]])
    x = torch.randn(12, D)
    torch.testing.assert_close(balanced(x), plain(x))


def test_a_balanced_capacity_layer_shares_the_plain_layers_rows_among_its_slots():
    # capacity 0.75: the plain layer's 4 experts hold 5 rows each; the 6 slots share those 20 rows, 3 each
    plain = MoELayer(D, F, E, K, capacity_factor=0.75)
    balanced = MoELayer(D, F, E, K, capacity_factor=0.75, balance=True, redundant_experts=2)
    assert (plain.capacity(12), balanced.capacity(12)) == (5, 3)
    load_placement(balanced, Placement((3, 0, 1, 2, 3, 3), E, 1), 0, logical_weights())
    expert_ids = torch.tensor([[3, 0]] * 12)  # every token's first choice is the hot expert 3
    scores = torch.ones(12, K)
    kept = ops.capacity_slots(physical_slots(expert_ids, balanced.route_slots, balanced.route_count), scores,
                              balanced.num_slots, balanced.capacity(12), "position") >= 0
    # expert 3's three copies keep 9 of its 12 pairs where its one plain slot keeps 5; expert 0 keeps 3, not 5
    assert kept[:, 0].sum() == 9 and kept[:, 1].sum() == 3
    assert (ops.capacity_slots(expert_ids, scores, E, plain.capacity(12), "position") >= 0).sum(0).tolist() == [5, 5]


@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_a_balanced_capacity_layer_that_drops_nothing_is_the_plain_layer_whatever_its_replicas(drop_policy):
    # capacity 3.0: each of the 6 slots holds 12 rows, every pair an expert can get from 12 tokens
    weights = logical_weights()
    weights[0][3] *= 2  # expert 3 is hot (twice the gate) and has three copies
    plain = MoELayer(D, F, E, K, capacity_factor=3.0, drop_policy=drop_policy)
    balanced = MoELayer(D, F, E, K, capacity_factor=3.0, drop_policy=drop_policy, balance=True, redundant_experts=2)
    with torch.no_grad():
        plain.gate.weight.copy_(weights[0]), plain.w_gate_up.copy_(weights[1]), plain.w_down.copy_(weights[2])
    load_placement(balanced, Placement((3, 0, 1, 2, 3, 3), E, 1), 0, weights)
    assert balanced.capacity(12) == 12
    x = torch.randn(12, D, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    torch.testing.assert_close(balanced(x), plain(y))
    balanced(x).square().sum().backward()
    plain(y).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(balanced.gate.weight.grad, plain.gate.weight.grad)
    # each logical expert's gradient is the sum of its replicas'
    for expert, slots in enumerate([[1], [2], [3], [0, 4, 5]]):
        torch.testing.assert_close(balanced.w_down.grad[slots].sum(0), plain.w_down.grad[expert])


def test_a_new_placement_reaches_the_compiled_graph_without_a_recompile():
    counters.clear()
    weights = logical_weights()
    layer = MoELayer(D, F, E, K, capacity_factor=4.0, balance=True, redundant_experts=2)
    compiled = torch.compile(layer, backend="moe_ascend", options={"target": "eager"})
    x = torch.randn(12, D)
    outputs = []
    for placement in [Placement((0, 1, 2, 3, 0, 1), E, 1), Placement((3, 3, 2, 1, 0, 2), E, 1)]:
        load_placement(layer, placement, 0, weights)
        outputs.append(compiled(x))
        torch.testing.assert_close(outputs[-1], layer(x))
    torch.testing.assert_close(outputs[0], outputs[1])  # the same experts, wherever they live
    assert counters["stats"]["unique_graphs"] == 1
    layer.expert_load.zero_()
    expert_ids = layer.route(x)[1]
    compiled(x)  # the compiled graph counts tokens per logical expert, on device
    assert layer.expert_load.tolist() == torch.bincount(expert_ids.flatten(), minlength=E).tolist()
    assert counters["stats"]["unique_graphs"] == 1


# --- migration on two real ranks ---------------------------------------------------------------

START, MOVED = Placement((0, 1, 0, 2, 3, 2), E, 2), Placement((3, 0, 1, 2, 1, 0), E, 2)
WITHIN_RANKS = Placement((1, 0, 0, 2, 2, 3), E, 2)


def _train(layer, optimizer, rank, steps, on_step=None):
    losses = []
    for step in range(steps):
        x = torch.randn(16, D, generator=torch.Generator().manual_seed(100 * step + rank))
        loss = layer(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


def _state(layer, optimizer):
    tensors = {"w_gate_up": layer.w_gate_up, "w_down": layer.w_down, "slots": layer.replica_slots}
    for name in ("w_gate_up", "w_down"):
        for key, value in optimizer.state[getattr(layer, name)].items():
            tensors[f"{name}.{key}"] = value
    return {k: v.detach().clone() for k, v in tensors.items()}


def _bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point()
                                                    else a[k],
                                                    b[k].view(-1).view(torch.uint8) if b[k].is_floating_point()
                                                    else b[k]) for k in a)


class HotExpertsOnRank0(MoELayer):
    """Most tokens go to experts 0 and 1, which the initial placement puts on rank 0."""

    def route(self, tokens):
        return ops.topk_softmax(self.gate(tokens) + torch.tensor([4.0, 4.0, 0.0, 0.0]), self.top_k, self.renormalize)


def _migration_scenarios(rank, world_size):
    def fresh(placement):
        torch.manual_seed(0)
        layer = MoELayer(D, F, E, K, ep_group=dist.group.WORLD, balance=True, redundant_experts=2)
        load_placement(layer, placement, rank, logical_weights())
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
        return layer, optimizer

    results = {}
    # 1. A round trip loses nothing: parameters, gradients and Adam's moments come back bitwise.
    layer, optimizer = fresh(START)
    balancer = ExpertBalancer(layer, optimizer, interval=10**9)  # replicas' gradients summed; never plans itself
    _train(layer, optimizer, rank, 2)
    before = _state(layer, optimizer)
    there = migrate([layer], [MOVED], optimizer)
    back = migrate([layer], [START], optimizer)
    results["round_trip"] = there.committed and back.committed and there.moved_slots > 0 and \
        _bitwise_equal(before, _state(layer, optimizer))
    shuffled = migrate([layer], [WITHIN_RANKS], optimizer)  # nothing crosses ranks: empty exchanges
    unshuffled = migrate([layer], [START], optimizer)
    results["round_trip"] &= shuffled.committed and unshuffled.committed and shuffled.bytes_received == 0 and \
        _bitwise_equal(before, _state(layer, optimizer))

    # 2. Training after a migration matches training that used the new placement from the start.
    def move_after_second(step):
        if step == 1:
            assert migrate([layer], [MOVED], optimizer).committed
    layer, optimizer = fresh(START)
    balancer = ExpertBalancer(layer, optimizer, interval=10**9)
    results["migrated_losses"] = _train(layer, optimizer, rank, 5, move_after_second)
    balancer.remove()
    layer, optimizer = fresh(MOVED)
    balancer = ExpertBalancer(layer, optimizer, interval=10**9)
    results["placed_losses"] = _train(layer, optimizer, rank, 5)
    balancer.remove()

    # 3. A failure on one rank in the middle: every rank keeps the old placement, and training goes on.
    def fail_on_rank_1(stage):
        if rank == 1 and stage == "exchanged":
            raise RuntimeError("injected")
    layer, optimizer = fresh(START)
    balancer = ExpertBalancer(layer, optimizer, interval=10**9)
    _train(layer, optimizer, rank, 2)
    before = _state(layer, optimizer)
    failed = migrate([layer], [MOVED], optimizer, fault=fail_on_rank_1)
    results["failed"] = (failed.committed, failed.error)
    results["kept"] = _bitwise_equal(before, _state(layer, optimizer))
    results["goes_on"] = _train(layer, optimizer, rank, 1)[0]

    # 4. The balancer on its own: it sees rank 0 overloaded and moves experts, and the ranks decide alike (their
    # clocks never agree exactly: a rank deciding from its own step time alone could migrate alone and hang).
    torch.manual_seed(0)
    layer = HotExpertsOnRank0(D, F, E, K, ep_group=dist.group.WORLD, balance=True, redundant_experts=2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    balancer = ExpertBalancer(layer, optimizer, interval=2, min_interval=4, horizon=10, bandwidth=1e12)
    _train(layer, optimizer, rank, 11)
    results["balancer"] = {"placement": layer.placement.slot_experts,
                           "decisions": [(w["step"], w.get("migrated")) for w in balancer.windows],
                           "imbalance": [w["imbalance"] for w in balancer.windows],
                           "committed": [m.committed for m in balancer.migrations]}
    return results


def test_migration_is_lossless_all_or_nothing_and_training_continues_as_if_placed_so():
    results = run_ranks(2, _migration_scenarios)
    for rank, result in enumerate(results):
        assert result["round_trip"], f"rank {rank}: state changed on a round trip"
        torch.testing.assert_close(result["migrated_losses"], result["placed_losses"], rtol=1e-5, atol=1e-6)
        assert result["failed"][0] is False
        assert "rank 1, exchanged: RuntimeError: injected" in result["failed"][1] or rank == 0
        assert result["kept"], f"rank {rank}: a failed migration changed state"
        assert result["goes_on"] == result["goes_on"]  # a number, not NaN
    first, second = (result["balancer"] for result in results)
    assert first["committed"] and all(first["committed"]), "the skewed load should have been rebalanced"
    assert first["placement"] == second["placement"] and first["decisions"] == second["decisions"]
    assert first["imbalance"][-1] < first["imbalance"][0] - 0.2


def test_the_balancer_takes_the_link_rate_from_the_emulated_cluster_it_runs_in(monkeypatch):
    import json

    from moe_ascend.runtime.balance.balancer import link_bytes_per_s
    monkeypatch.setenv("MOE_ASCEND_CLUSTER", json.dumps({"shaped": True, "bandwidth_bits_per_s": 1e10}))
    assert link_bytes_per_s() == 1.25e9
    monkeypatch.setenv("MOE_ASCEND_CLUSTER", json.dumps({"shaped": False, "bandwidth_bits_per_s": 1e10}))
    assert link_bytes_per_s() == 125e6  # loopback: nothing shaped, so no rate to trust
    monkeypatch.delenv("MOE_ASCEND_CLUSTER")
    assert link_bytes_per_s() == 125e6


def test_a_placement_pays_each_step_for_the_replicas_it_spreads_across_ranks():
    layer = MoELayer(D, F, E, K, balance=True, redundant_experts=2)
    balancer = ExpertBalancer(layer, torch.optim.SGD(layer.parameters(), lr=0.0), bandwidth=1e6)
    balancer.ranks = 2  # the model as on two ranks: a ring all_reduce sends 2(W-1)/W = once the bytes
    expert_bytes = slot_bytes([layer.w_gate_up, layer.w_down])  # one expert's two weights
    spread, kept_home = Placement((0, 1, 2, 3, 0, 1), E, 2), Placement((0, 1, 0, 2, 3, 2), E, 2)
    assert balancer._replica_sum_seconds([spread]) == pytest.approx(2 * expert_bytes / 1e6)
    assert balancer._replica_sum_seconds([kept_home]) == 0.0
    balancer.windows = [{"busiest": 100.0, "step_time_s": 1.0}]  # half of a second per step is expert compute
    # even load: both balance the ranks alike (50 tokens each), so spreading the replicas only costs their sums
    load = torch.tensor([[25.0, 25.0, 25.0, 25.0]])
    assert balancer._seconds_saved([spread], load) - balancer._seconds_saved([kept_home], load) == \
        pytest.approx(-2 * expert_bytes / 1e6)


def test_the_replica_sums_cost_the_share_of_their_wire_time_the_steps_waited_for(monkeypatch):
    model = torch.nn.Sequential(*(MoELayer(D, F, E, K, balance=True, redundant_experts=2) for _ in range(2)))
    balancer = ExpertBalancer(model, torch.optim.SGD(model.parameters(), lr=0.0), interval=5, bandwidth=1e6)
    balancer.ranks = 2  # as on two ranks: a ring all_reduce sends 2(W-1)/W = once the bytes
    spread = [Placement((0, 1, 2, 3, 0, 1), E, 2)] * 2  # two experts' replicas across the ranks, in each layer
    wire = 2 * 2 * slot_bytes([model[0].w_gate_up, model[0].w_down]) / 1e6
    # before a measurement: the first layer's sums end backward with nothing left to run under, the other's hide
    assert balancer._replica_sum_seconds(spread) == pytest.approx(wire / 2)
    # while they span ranks, a window's steps waited a tenth of their wire time for them: that is their cost
    monkeypatch.setattr(ExpertBalancer, "placements", property(lambda self: spread))
    balancer._replica_wait = 5 * wire / 10
    balancer._measure_exposed_share()
    assert balancer.exposed_share == pytest.approx(0.1) and balancer._replica_wait == 0.0
    assert balancer._replica_sum_seconds(spread) == pytest.approx(wire / 10)
    assert balancer.state_dict()["exposed_share"] == pytest.approx(0.1)


def test_the_projection_to_expert_parallel_scale_migrates_only_where_it_pays():
    from moe_ascend.compiler.planner.balance_projection import project

    even = torch.full((20, 1, 64), 128)  # 20 steps of one layer, every expert equally loaded
    for target in project(even)["targets"].values():
        assert target["ours"]["migrations"] == 0 and target["ours"]["gain"] == pytest.approx(0, abs=1e-12)
        assert target["eplb"]["gain"] <= 1e-12  # (it re-plans regardless: at best nothing gained)
    hot = even.clone()
    hot[:, :, 5] *= 8  # one expert takes eight times its share, every step
    skewed = project(hot)
    ep64 = skewed["targets"]["ascend-910b/ep64"]
    assert ep64["off"]["step_s"] > ep64["ours"]["step_s"] and ep64["ours"]["migrations"] >= 1
    assert skewed["projected_gain_ep64"] == ep64["ours"]["gain"] > 0.2 and skewed["simulation"] is True
