"""On every rank: the hierarchical exchange against the flat one, same weights, same tokens
(``hierarchical.py equal|golden``)."""

import contextlib
import json
import sys

import torch
import torch.distributed as dist

import moe_ascend.kernels as ops
from moe_ascend.kernels import hierarchical
from moe_ascend.kernels.exchange import even_bounds
from moe_ascend.runtime import MoELayer, Topology
from moe_ascend.runtime.launcher import end_process_group


def layer_and_tokens(num_experts=16, top_k=4, tokens=24, d=8, policy="position", capacity_factor=1.0,
                     hierarchical_a2a=False):
    torch.manual_seed(0)  # same weights everywhere (each rank holds its own experts' slice)
    layer = MoELayer(d, 16, num_experts, top_k, capacity_factor=capacity_factor, ep_group=dist.group.WORLD,
                     drop_policy=policy, hierarchical_a2a=hierarchical_a2a).double()
    torch.manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, d, dtype=torch.float64, requires_grad=True)
    return layer, x


def hierarchical_forward(layer, x, h, chunks=1):
    """The layer's output through the two-step exchange; capacity layers in ``chunks`` windows of the slots,
    summed (dropless ones in ``chunks`` pipelined chunks of tokens)."""
    weights, ids = ops.topk_softmax(layer.gate(x), layer.top_k, layer.renormalize)
    if layer.capacity_factor is None:
        return hierarchical.dropless_moe(x, ids, weights, layer.num_experts, h, layer._experts_grouped, chunks)
    capacity = layer.capacity(x.shape[0])
    out = 0
    for window in even_bounds(capacity, chunks):
        expert_in, plan = hierarchical.capacity_dispatch(x, ids, weights, weights, layer.num_experts, capacity,
                                                         layer.drop_policy, h, slots=window if chunks > 1 else None)
        out = out + hierarchical.capacity_combine(layer._experts_batched(expert_in), plan, h)
    return out


def gradients(layer, x, out):
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    out.backward(grad)
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return got


def largest_difference(expected: list, got: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))


def equal() -> dict:
    """Both checks below; one process start."""
    return {"rank": dist.get_rank(), "eager": eager()["max_abs_diff"], "compiled": compiled()["max_abs_diff"]}


def equal_whole() -> dict:
    """``equal`` with the exchange compiled whole only (not in chunks or token groups): the larger cluster's."""
    return {"rank": dist.get_rank(), "eager": eager()["max_abs_diff"],
            "compiled": compiled(COMPILED[:2])["max_abs_diff"]}


def eager() -> dict:
    topology = Topology.detect()
    h = topology.hierarchy()
    worst = {}
    for mode, policy, capacity_factor, chunks in (("position", "position", 1.0, 1), ("score", "score", 1.0, 1),
                                                   ("score_3_windows", "score", 1.0, 3),
                                                   ("dropless", "position", None, 1),
                                                  ("dropless_3_chunks", "position", None, 3)):
        layer, x = layer_and_tokens(policy=policy, capacity_factor=capacity_factor)
        flat = layer(x)
        flat_grads = gradients(layer, x, flat)
        hier = hierarchical_forward(layer, x, h, chunks)
        hier_grads = gradients(layer, x, hier)
        worst[mode] = largest_difference([flat, *flat_grads], [hier, *hier_grads])
    return {"rank": dist.get_rank(), "max_abs_diff": worst}


@contextlib.contextmanager
def dispatches_counted():
    """``[dispatches, matmuls]``: in the pre_grad graph once every pass ran, the two-step dispatches (one per chunk
    or group) and the expert matmuls that skip empty slots."""
    from moe_ascend.passes import PassResult, register_pass, unregister_pass
    from moe_ascend.passes.analysis.ops import op_name

    counted = [0, 0]

    @register_pass(name="count_dispatches", stage="pre_grad",
                   after=("chunk_for_overlap", "token_groups", "skip_empty_slots"), roles=("dynamo",))
    def count(gm, ctx):
        counted[0] = sum(n.target is hierarchical.capacity_dispatch for n in gm.graph.nodes)
        counted[1] = sum(op_name(n) == "grouped_mm_filled" for n in gm.graph.nodes)
        return PassResult(gm, False)

    try:
        yield counted
    finally:
        unregister_pass("count_dispatches")


# (name, drop policy, overlap option, capacity factor): C = 6 slots per expert; with a capacity factor of 4,
# C = 24 = T holds every token, as token groups need
COMPILED = (("position", "position", False, 1.0), ("score", "score", False, 1.0),
            ("position_2_chunks", "position", 2, 1.0),
            ("position_2_token_groups", "position", {"token_groups": 2}, 4.0))


def compiled(cases=COMPILED) -> dict:
    """MoELayer compiled with the hierarchical_a2a=True option (capacity), or built with it (dropless, whose
    exchange runs between graphs), against the same layer run eagerly (flat)."""
    import os

    dump_dir = os.environ.get("DUMP_DIR")
    worst = {}
    for name, policy, overlap, capacity_factor in cases:
        layer, x = layer_and_tokens(policy=policy, capacity_factor=capacity_factor)
        flat = layer(x)
        flat_grads = gradients(layer, x, flat)
        torch._dynamo.reset()
        options = ({"hierarchical_a2a": True, "target": "eager", "overlap": overlap}
                   | ({"dump_dir": dump_dir} if dump_dir and name == "score" else {}))
        compiled_layer = torch.compile(layer, backend="moe_ascend", options=options)
        with dispatches_counted() as dispatches:
            hier = compiled_layer(x)
        hier_grads = gradients(layer, x, hier)
        worst[name] = largest_difference([flat, *flat_grads], [hier, *hier_grads])
        worst[name + " dispatches"], worst[name + " filled matmuls"] = dispatches
    layer, x = layer_and_tokens(capacity_factor=None)
    flat = layer(x)
    flat_grads = gradients(layer, x, flat)
    two_step, x = layer_and_tokens(capacity_factor=None, hierarchical_a2a=True)
    torch._dynamo.reset()
    hier = torch.compile(two_step, backend="moe_ascend", options={"target": "eager"})(x)
    hier_grads = gradients(two_step, x, hier)
    worst["dropless"] = largest_difference([flat, *flat_grads], [hier, *hier_grads])
    return {"rank": dist.get_rank(), "max_abs_diff": worst}


def golden() -> dict:
    """The collectives of the compiled forward graph, in order, named by the group they run on, and the pre_grad
    graph's calls: the two-step exchange whole (``overlap=False``), and in two chunks (``chunked_``)."""
    from moe_ascend.passes import PassResult, register_pass, unregister_pass
    from moe_ascend.passes.analysis.ops import collective_group, is_collective, op_name

    hierarchy = Topology.detect().hierarchy()
    names = {hierarchy.intra_group: "intra", hierarchy.inter_group: "inter", dist.group.WORLD.group_name: "world"}
    seen, prefix = {}, [""]

    @register_pass(name="record_collectives", stage="post_grad", after=("verify_collectives",))
    def record(gm, ctx):
        seen[prefix[0] + ctx.role] = [[op_name(n), names.get(collective_group(n), "other")] for n in gm.graph.nodes
                                      if is_collective(n)]
        return PassResult(gm, False)

    @register_pass(name="record_pre_grad", stage="pre_grad", after=("chunk_for_overlap",), before=("skip_empty_slots",),
                   roles=("dynamo",))
    def record_pre_grad(gm, ctx):
        seen[prefix[0] + "pre_grad"] = [n.name for n in gm.graph.nodes if n.op == "call_function"]
        return PassResult(gm, False)

    try:
        for prefix[0], overlap in (("", False), ("chunked_", 2)):
            layer, x = layer_and_tokens()
            torch._dynamo.reset()
            torch.compile(layer, backend="moe_ascend", options={"hierarchical_a2a": True, "target": "eager",
                                                                 "overlap": overlap})(x).sum().backward()
    finally:
        unregister_pass("record_collectives")
        unregister_pass("record_pre_grad")
    return {"rank": dist.get_rank(), **seen}


def traffic() -> dict:
    """This rank's bytes per kind of link for one training step, counted by the runtime, four ways; and the
    bytes and collectives the inspect report shows for the compiled hierarchical graphs."""
    import tempfile

    from moe_ascend.compiler.report.inspect import format_table, load_summary
    from moe_ascend.runtime import traffic as counter

    topology = Topology.detect()
    h = topology.hierarchy()
    layer, x = layer_and_tokens()

    def one_step(forward) -> dict:
        counter.reset()
        forward(x).sum().backward()
        return counter.read().to_json()

    counts = {"eager_flat": one_step(layer),
              "eager_hierarchical": one_step(lambda t: hierarchical_forward(layer, t, h))}
    dump_dir = tempfile.mkdtemp()
    for name, setting in (("compiled_flat", False), ("compiled_hierarchical", True)):
        torch._dynamo.reset()
        options = {"hierarchical_a2a": setting, "target": "eager"} | ({"dump_dir": dump_dir} if setting else {})
        compiled_layer = torch.compile(layer, backend="moe_ascend", options=options)
        one_step(compiled_layer)  # compiles forward and backward
        counts[name] = one_step(compiled_layer)
    table = [line.strip() for line in format_table(load_summary(dump_dir)).splitlines()]
    return {"rank": dist.get_rank(), **counts, "report": [line for line in table if "bytes per run" in line],
            "collectives": [line for line in table if line.startswith("collectives:")]}


if __name__ == "__main__":
    # ``hierarchical.py CHECK``: its result; ``hierarchical.py CHECK CHECK ...``: each under its name, one start
    dist.init_process_group("gloo")
    checks = {name: globals()[name]() for name in sys.argv[1:]}
    result = next(iter(checks.values())) if len(checks) == 1 else {"rank": dist.get_rank(), **checks}
    print("RESULT " + json.dumps(result), flush=True)
    end_process_group()
