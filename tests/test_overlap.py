"""Chunked dispatch and the overlap schedule: the graphs they produce, and that they compute what the layer does."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import launch, run_ranks
from graphs import code_lines

from moe_ascend.passes import PassResult
from moe_ascend.passes.analysis.ops import is_collective, is_wait, op_name
from moe_ascend.runtime import MoELayer
from moe_ascend.runtime.launcher import ClusterSpec, shaping_unavailable

EXPERT_MATMULS = ("grouped_mm_batched", "bmm")


def small_layer(**kwargs):
    torch.manual_seed(0)  # 4 experts over 2 ranks, 12 tokens: 6 slots per expert
    return MoELayer(8, 16, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD, **kwargs)


def compiled_graphs(temporary_passes, options, layer=None, x=None):
    """Run one training step; return the code after chunk_for_overlap and each post-grad graph's nodes."""
    seen = {}

    @temporary_passes(name="probe_pre_grad", stage="pre_grad", after=("chunk_for_overlap",), roles=("dynamo",))
    def probe_pre_grad(gm, ctx):
        seen["pre_grad"] = code_lines(gm)
        return PassResult(gm, False)

    @temporary_passes(name="probe_post_grad", stage="post_grad", after=("schedule_overlap",))
    def probe_post_grad(gm, ctx):
        seen[ctx.role] = list(gm.graph.nodes)
        return PassResult(gm, False)

    x = torch.randn(12, 8, requires_grad=True) if x is None else x
    torch.compile(layer or small_layer(), backend="moe_ascend",
                  options={"target": "eager", **options})(x).sum().backward()
    return seen


def test_chunk_for_overlap_splits_the_slots_and_sends_every_chunk_before_the_experts(fake_two_ranks, temporary_passes):
    lines = compiled_graphs(temporary_passes, {"overlap": 3})["pre_grad"]
    exchange = [re.sub(r";.*", "", line) for line in lines
                if re.search(r"slots_\d =|to_experts|from_experts|cat\(", line)]
    assert exchange == [
        "slots_0 = torch.narrow(dispatched, 1, 0, 2)",
        "expert_in_0 = moe_ascend_kernels_exchange_to_experts(slots_0, '0', 2)",
        "slots_1 = torch.narrow(dispatched, 1, 2, 2)",
        "expert_in_1 = moe_ascend_kernels_exchange_to_experts(slots_1, '0', 2)",
        "slots_2 = torch.narrow(dispatched, 1, 4, 2)",
        "expert_in_2 = moe_ascend_kernels_exchange_to_experts(slots_2, '0', 2)",
        "returned_0 = moe_ascend_kernels_exchange_from_experts(expert_out_1, '0', 2)",
        "returned_1 = moe_ascend_kernels_exchange_from_experts(expert_out_2, '0', 2)",
        "returned_2 = moe_ascend_kernels_exchange_from_experts(expert_out_3, '0', 2)",
        "returned = torch.cat([returned_0, returned_1, returned_2], 1)",
    ]
    # each chunk's two expert matmuls
    assert sum("ops.moe_ascend.grouped_mm_batched" in line for line in lines) == 2 * 3
    assert not any("all_to_all_single" in line for line in lines)  # the flat exchange is gone


def _chunk(node):
    return (node.meta.get("custom") or {}).get("moe", {}).get("chunk")


def pipeline_violations(nodes) -> list[str]:
    """Where the next chunk's incoming all-to-all is not in flight across this chunk's expert matmuls.

    Chunks are taken in the order the graph computes their experts (the backward goes from the last chunk
    to the first); a chunk's incoming all-to-all is the first one of it the graph issues.
    """
    position = {n: i for i, n in enumerate(nodes)}
    matmuls: dict[int, list] = {}
    incoming: dict[int, object] = {}
    for node in nodes:
        if op_name(node) in EXPERT_MATMULS and _chunk(node) is not None:
            matmuls.setdefault(_chunk(node), []).append(node)
        if is_collective(node) and _chunk(node) is not None:
            incoming.setdefault(_chunk(node), node)
    chunks = sorted(matmuls, key=lambda c: position[matmuls[c][0]])
    problems = []
    for this, following in zip(chunks, chunks[1:]):
        issue = incoming[following]
        wait = next(u for u in issue.users if is_wait(u))
        first, last = position[matmuls[this][0]], position[matmuls[this][-1]]
        if not position[issue] < first:
            problems.append(f"chunk {following}'s {issue.name} is issued after chunk {this}'s first expert matmul")
        if not position[wait] > last:
            problems.append(f"chunk {following}'s {wait.name} comes before chunk {this}'s last expert matmul")
    return problems


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_the_next_chunks_all_to_all_is_in_flight_across_this_chunks_experts(fake_two_ranks, temporary_passes, chunks):
    graphs = compiled_graphs(temporary_passes, {"overlap": chunks})
    for role in ("forward", "backward"):
        assert len({_chunk(n) for n in graphs[role] if op_name(n) in EXPERT_MATMULS}) == chunks, role
        assert pipeline_violations(graphs[role]) == [], role


def test_without_overlap_each_all_to_all_is_waited_for_at_once(fake_two_ranks, temporary_passes):
    graphs = compiled_graphs(temporary_passes, {"overlap": False})
    for role in ("forward", "backward"):
        nodes = graphs[role]
        issued = [n for n in nodes if is_collective(n)]
        assert len(issued) == 2, role
        assert all(nodes[nodes.index(n) + 1] is next(iter(n.users)) for n in issued), role


class ScaledExperts(MoELayer):
    """Row-wise work on either side of the experts, which the recogniser gives to the dispatch and the combine."""

    def _experts_batched(self, x):
        return super()._experts_batched(x * 2.0) * 0.5


class SlotCentredExperts(MoELayer):
    """Experts that subtract the mean over their slots: a chunk of slots would see another mean."""

    def _experts_batched(self, x):
        return super()._experts_batched(x - x.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("overlap, level", [(2, "WARNING"), ("auto", "INFO")])
def test_experts_that_mix_slots_keep_one_exchange_and_say_which_node(fake_two_ranks, temporary_passes, caplog,
                                                                     overlap, level):
    torch.manual_seed(0)
    layer = SlotCentredExperts(8, 16, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD)
    with caplog.at_level("INFO", logger="moe_ascend"):
        graphs = compiled_graphs(temporary_passes, {"overlap": overlap}, layer)
    said = [r for r in caplog.records if "not chunked for overlap" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == level
    assert re.search(r"MoE layer 0 is not chunked for overlap: its expert node \w+ \(mean\) is not known to work "
                     r"slot by slot", said[0].getMessage())
    assert sum(is_collective(n) for n in graphs["forward"]) == 2


def test_chunks_asked_for_in_one_process_are_refused_with_the_reason(temporary_passes, caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="moe_ascend"):
        compiled_graphs(temporary_passes, {"overlap": 2}, MoELayer(8, 16, 4, 2, capacity_factor=1.0))
    said = [r for r in caplog.records if "not chunked for overlap" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert said[0].getMessage().endswith("MoE layer 0 is not chunked for overlap: it exchanges nothing (one process, "
                                         "or every expert is local): there is no all-to-all to hide")


def overlapped_pairs(code: str) -> int:
    """How many all-to-alls of Inductor's generated code have an expert matmul between their issue and wait."""
    lines = code.splitlines()
    issued = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(buf\d+) = torch\.ops\._c10d_functional\.all_to_all_single", line))}
    matmuls = [i for i, line in enumerate(lines)
               if "grouped_mm_batched.default(" in line or "extern_kernels.bmm(" in line]
    waits = {m.group(1): i for i, line in enumerate(lines)
             if (m := re.match(r"\s*torch\.ops\._c10d_functional\.wait_tensor\.default\((buf\d+)\)", line))}
    return sum(any(issued[b] < m < waits[b] for m in matmuls) for b in issued)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [3, False])
def test_inductor_keeps_the_schedule(fake_two_ranks, overlap):
    # Chunks 1..n-1 arrive while an earlier chunk computes, and combines 0..n-2 return while a later one does
    # (the backward hides more: weight gradients fill the last transfers); unscheduled, nothing is in flight.
    from torch._inductor.utils import run_and_get_code

    layer = small_layer()
    compiled = torch.compile(layer, backend="moe_ascend", options={"target": "inductor", "overlap": overlap})
    x = torch.randn(12, 8, requires_grad=True)
    _, (forward, backward) = run_and_get_code(lambda: compiled(x).sum().backward())
    if overlap:
        assert overlapped_pairs(forward) == 2 * (overlap - 1)
        assert overlapped_pairs(backward) >= 2 * (overlap - 1)
    else:
        assert overlapped_pairs(forward) == overlapped_pairs(backward) == 0


def chunked_equals_unchunked(rank, world_size, runs):
    """Each run ``(target, chunks, mode)`` against the same layer unchunked and eager, forward and backward.

    Capacity modes (a drop policy) are chunked by the compiler (``overlap=chunks``); dropless layers by
    ``MoELayer(overlap_chunks=chunks)``, run eagerly (target None) or compiled.
    """
    worst = {}
    for target, chunks, mode in runs:
        def build(**kwargs):
            torch.manual_seed(0)
            capacity = {"capacity_factor": None} if mode == "dropless" else {
                "capacity_factor": 1.5, "drop_policy": "position" if mode == "scaled" else mode}
            kind = ScaledExperts if mode == "scaled" else MoELayer
            return kind(8, 16, 8, 3, ep_group=dist.group.WORLD, **capacity, **kwargs).double()

        torch.manual_seed(1 + rank)
        x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(20, 8, dtype=torch.float64)

        def step(layer, forward):
            out = forward(x)
            out.backward(grad)
            got = [out.detach(), x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
            x.grad = None
            layer.zero_grad(set_to_none=True)
            return got

        reference = build()
        expected = step(reference, reference)
        layer = build(overlap_chunks=chunks) if mode == "dropless" else reference
        options = {"target": target, "overlap": False if mode == "dropless" else chunks}
        torch._dynamo.reset()
        got = step(layer, torch.compile(layer, backend="moe_ascend", options=options) if target else layer)
        worst[f"{target}/{chunks}/{mode}"] = max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))
    return worst


@pytest.mark.slow
def test_chunked_and_scheduled_equals_the_layer_forward_and_backward():
    runs = [("eager", 2, "position"), ("eager", 4, "score"), ("inductor", 3, "position"),
            ("eager", 2, "scaled"),
            (None, 2, "dropless"), (None, 3, "dropless"), (None, 4, "dropless"), ("eager", 3, "dropless")]
    for worst in run_ranks(2, chunked_equals_unchunked, runs):
        assert set(worst) == {f"{t}/{n}/{m}" for t, n, m in runs}
        assert max(worst.values()) < 1e-12, worst


def random_scheduled_steps(rank, world_size, seeds, steps):
    """Random chunked and scheduled two-layer models (four for each of ``seeds``), compiled alike on every rank,
    each rank with its own tokens and its own pace; returns the steps it finished."""
    # the first seed's last model under Inductor on rank 0 (its reordering must keep the schedule the eager ranks
    # follow), every other one eager
    return sum(_random_scheduled_steps(rank, seed, steps, inductor=seed == seeds[0] and rank == 0) for seed in seeds)


def _random_scheduled_steps(rank, seed, steps, inductor):
    import random
    import time

    shared = random.Random(seed)  # the same models and options on every rank
    own = random.Random(seed * 100 + rank)  # this rank's tokens and pauses
    done = 0
    for target in ("eager", "eager", "eager", "inductor" if inductor else "eager"):
        top_k, chunks = shared.choice([1, 2, 3]), shared.choice([2, 3, 4])
        layers = [MoELayer(8, 16, 8, top_k, capacity_factor=shared.choice([0.5, 1.0, 2.0]), ep_group=dist.group.WORLD,
                           drop_policy=shared.choice(["position", "score"]), num_shared_experts=shared.choice([0, 1]))
                  for _ in range(2)]
        model = torch.nn.Sequential(*layers)
        torch._dynamo.reset()
        overlap = shared.choice([chunks, {"token_groups": 2, "changes_numerics": True}])
        compiled = torch.compile(model, backend="moe_ascend", options={"target": target, "overlap": overlap})
        tokens = shared.choice([8, 16, 24])
        for _ in range(steps):
            time.sleep(own.random() * 0.02)
            x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(own.randrange(2**31)))
            compiled(x).square().sum().backward()
            done += 1
    return done


@pytest.mark.slow
def test_scheduled_graphs_never_hang_on_four_ranks():
    # Four random models in one job, one lowered by Inductor on rank 0. A collective that waits 60 s fails its
    # rank; ranks silent for 300 s fail the test, named, as a hang.
    assert run_ranks(4, random_scheduled_steps, (1,), 5, timeout=300, collective_timeout=60) == [20] * 4


def measured_step(rank, world_size, dump_dir):
    """Three training steps of the small layer, exchanged in 2 chunks, with profile=True: rank 0's summary."""
    from moe_ascend.compiler.report.inspect import format_table, load_summary

    options = {"target": "eager", "overlap": 2, "profile": True, "dump_dir": dump_dir}
    compiled = torch.compile(small_layer(), backend="moe_ascend", options=options)
    x = torch.randn(12, 8, requires_grad=True)
    for _ in range(3):
        compiled(x).sum().backward()
    summary = load_summary(f"{dump_dir}/rank{rank}")
    return ({g["role"]: {k: g.get(k) for k in ("measured", "collectives")} for g in summary["graphs"]},
            format_table(summary))


@pytest.mark.slow
def test_profile_measures_each_graph_with_its_transfers_waits_and_compute(tmp_path):
    for graphs, table in run_ranks(2, measured_step, str(tmp_path)):
        assert graphs["dynamo"]["measured"] is None
        for role in ("forward", "backward"):
            measured = graphs[role]["measured"]
            lanes = {lane: [e for e in measured["events"] if e["lane"] == lane] for lane in ("comm", "wait", "compute")}
            exchanges = sum(graphs[role]["collectives"]["all_to_all_single"].values())
            assert exchanges == 4  # 2 chunks, dispatch and combine
            # each one's transfer (MoELayer exchanges on the receive-first group)
            assert [e["node"] for e in lanes["comm"]] == ["moe_ascend_gloo:all_to_all"] * exchanges
            assert len(lanes["wait"]) == exchanges
            assert all(0 <= e["start"] <= e["end"] <= measured["step_s"] for e in measured["events"])
            assert measured["exposed_comm_s"] == pytest.approx(sum(e["end"] - e["start"] for e in lanes["wait"]))
            assert 0 < measured["compute_s"] < measured["step_s"] - measured["exposed_comm_s"] + 1e-9
            assert measured["hidden_fraction"] == pytest.approx(
                max(0.0, 1 - measured["exposed_comm_s"] / measured["comm_s"]))
        assert len(re.findall(r"  measured: step [\d.]+ ms, exposed communication [\d.]+ ms of [\d.]+ ms \(hidden",
                              table)) == 2


def test_a_measured_step_leaves_the_profiler_off_and_the_next_model_measurable():
    # The backward's window closes inside the backward, where stopping the profiler does not last.
    from moe_ascend.compiler.profile import measured_timelines

    for _ in range(2):
        torch.manual_seed(0)
        torch._dynamo.reset()  # a model of its own, compiled afresh
        before = measured_timelines()
        compiled = torch.compile(MoELayer(8, 16, 4, 2, capacity_factor=1.0), backend="moe_ascend",
                                 options={"target": "eager", "profile": True})
        for _ in range(3):
            compiled(torch.randn(12, 8, requires_grad=True)).sum().backward()
        assert not torch._C._autograd._profiler_enabled()
        assert sorted(g.rsplit(".", 1)[1] for g, t in measured_timelines().items() if before.get(g) is not t) == [
            "backward", "forward"]


@pytest.mark.parametrize("overlap_efficiency, chunks", [(1.0, 6), (0.0, 0)])
def test_auto_takes_the_chunk_count_the_step_model_predicts_fastest(fake_two_ranks, temporary_passes,
                                                                    cost_model_hardware, overlap_efficiency, chunks):
    # Slow experts beside a link they can hide: the more chunks the better, up to the 6 slots an expert has. The
    # same link where computation hides nothing: chunks only add latency, so the layer keeps one exchange.
    cost_model_hardware(matmul_flops=1e6, expert_matmul_flops=1e6, ranks_per_node=2, intra_node_latency=1e-5,
                        inter_node_latency=1e-5, overlap_efficiency=overlap_efficiency)
    lines = compiled_graphs(temporary_passes, {"overlap": "auto"})["pre_grad"]
    assert sum(bool(re.match(r"\s*slots_\d+ = torch\.narrow", line)) for line in lines) == chunks


@pytest.mark.parametrize("uplink, chunks", [("10gbit", 0), ("100mbit", 2)])
def test_auto_prices_the_link_the_launcher_shaped(fake_two_ranks, temporary_passes, monkeypatch, uplink, chunks):
    # Two nodes of one rank as `moe-ascend launch` describes them to each rank. Over a fast uplink a second
    # exchange costs more than it hides; over a slow one the chunked exchange is faster.
    cluster = ClusterSpec(nodes=2, ranks_per_node=1, inter_node_bandwidth=uplink)
    cluster.shaped = True
    monkeypatch.setenv("MOE_ASCEND_CLUSTER", cluster.to_json())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("MOE_ASCEND_HARDWARE", raising=False)
    torch.manual_seed(0)
    layer = MoELayer(512, 1024, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD)
    x = torch.randn(1024, 512, requires_grad=True)
    lines = compiled_graphs(temporary_passes, {"overlap": "auto", "hierarchical_a2a": False}, layer, x)["pre_grad"]
    assert sum(bool(re.match(r"\s*slots_\d+ = torch\.narrow", line)) for line in lines) == chunks


@pytest.mark.slow
@pytest.mark.skipif(shaping_unavailable() is not None, reason=f"no emulated cluster here: {shaping_unavailable()}")
@pytest.mark.parametrize("uplink, chunks", [("10gbit", 1), ("100mbit", 2)])
def test_auto_under_the_launcher_chooses_for_the_link_in_force(uplink, chunks):
    ranks = launch(2, 1, str(Path(__file__).parent / "cluster" / "auto_chunks.py"),
                   flags=("--inter-node-bandwidth", uplink))
    assert [rank["chunks"] for rank in ranks] == [chunks, chunks]


def test_a_value_waited_for_twice_is_waited_for_once_in_the_schedule(fake_two_ranks):
    # fc.wait_tensor on a traced collective's result adds a second wait on the first: the schedule takes it as done
    import torch.distributed._functional_collectives as fc
    from torch.fx.experimental.proxy_tensor import make_fx

    from moe_ascend.compiler.planner.cost_model import CostModel
    from moe_ascend.passes.schedule_overlap import overlap_order

    def reduced_twice(x):
        return fc.wait_tensor(fc.all_reduce(x.relu(), "sum", fake_two_ranks.group_name)) * 2

    gm = make_fx(reduced_twice)(torch.ones(4))
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.name for n in overlap_order(body, CostModel())] == [
        "relu", "all_reduce", "wait_tensor", "wait_tensor_1", "mul"]
