"""The pass API: declared order, cycles, opt-in and disable, and the contract checked after each pass."""

import operator

import pytest
import torch
from graphs import context, dynamo_graph

from moe_ascend.compiler.options import Options
from moe_ascend.compiler.pipeline import run_stage
from moe_ascend.kernels.errors import OptionError, PassContractError, PassError, PassOrderError, PassRegistrationError
from moe_ascend.passes import PassResult, infer_meta, ordered_passes


def noop(gm, ctx):
    return PassResult(gm, modified=False)


def names(stage, **options):
    return [p.name for p in ordered_passes(stage, Options.from_user(options))]


def test_built_in_order_is_declared_not_imported():
    assert names("pre_grad") == ["normalise", "functionalise", "find_moe", "hierarchical_a2a", "token_groups",
                                 "chunk_for_overlap", "skip_empty_slots"]
    assert names("pre_grad", passes=["canonicalise"]) == ["normalise", "functionalise", "find_moe", "canonicalise",
                                                          "hierarchical_a2a", "token_groups", "chunk_for_overlap",
                                                          "skip_empty_slots"]
    assert "token_groups" not in names("pre_grad", overlap=2)  # on under "auto" (its choice) or a group count
    assert names("post_grad") == ["schedule_overlap", "verify_collectives"]


def test_after_and_before_place_a_pass(temporary_passes):
    temporary_passes(name="t_late", stage="pre_grad", after=("find_moe",))(noop)
    temporary_passes(name="t_early", stage="pre_grad", before=("normalise",))(noop)
    temporary_passes(name="t_middle", stage="pre_grad", after=("normalise",), before=("find_moe",))(noop)
    assert names("pre_grad") == ["t_early", "normalise", "functionalise", "t_middle", "find_moe", "hierarchical_a2a",
                                 "token_groups", "chunk_for_overlap", "skip_empty_slots",
                                 "t_late"]  # ties: registration order


def test_a_cycle_is_an_error_naming_the_passes(temporary_passes):
    temporary_passes(name="t_a", stage="post_grad", after=("t_b",))(noop)
    temporary_passes(name="t_b", stage="post_grad", after=("t_a",))(noop)
    with pytest.raises(PassOrderError, match=r"cycle: t_a -> t_b -> t_a"):
        names("post_grad")


def test_constraint_on_a_pass_of_another_stage_is_an_error(temporary_passes):
    temporary_passes(name="t_cross", stage="post_grad", after=("find_moe",))(noop)
    with pytest.raises(PassRegistrationError, match="constraints only order passes of one stage"):
        names("post_grad")


def test_disable_removes_and_options_passes_enables(temporary_passes):
    temporary_passes(name="t_opt_in", stage="pre_grad", enabled=False)(noop)
    temporary_passes(name="t_numerics", stage="pre_grad", changes_numerics=True)(noop)
    assert "t_opt_in" not in names("pre_grad") and "t_numerics" not in names("pre_grad")
    assert "t_numerics" in names("pre_grad", passes=["t_numerics"])
    assert "find_moe" not in names("pre_grad", disable=["find_moe"])


def test_plain_callable_in_options_runs_last_in_pre_grad():
    def my_rewrite(gm, ctx):
        return PassResult(gm, False)

    assert names("pre_grad", passes=[my_rewrite])[-1] == "my_rewrite"


def test_unknown_pass_names_are_option_errors():
    with pytest.raises(OptionError, match="registered passes are"):
        names("pre_grad", disable=["no_such_pass"])
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        names("pre_grad", passes=["nope"])


def test_duplicate_name_is_refused(temporary_passes):
    temporary_passes(name="t_dup", stage="pre_grad")(noop)
    with pytest.raises(PassRegistrationError, match="registered already"):
        temporary_passes(name="t_dup", stage="pre_grad")(lambda gm, ctx: PassResult(gm, False))


def small_graph():
    return dynamo_graph(lambda x: torch.relu(x) * 2, torch.randn(3, 4))


def only(pass_name):
    return context(options={"disable": ["normalise", "find_moe"], "passes": [pass_name]})


def test_a_failing_pass_names_pass_stage_and_graph(temporary_passes):
    @temporary_passes(name="t_broken", stage="pre_grad", enabled=False)
    def broken(gm, ctx):
        raise KeyError("boom")

    with pytest.raises(PassError, match=r"pass 't_broken' \(stage pre_grad, graph graph_t\): KeyError: 'boom'"):
        run_stage(small_graph(), only("t_broken"))


def test_a_node_without_fake_metadata_is_caught(temporary_passes):
    @temporary_passes(name="t_no_meta", stage="pre_grad", enabled=False)
    def add_node_without_meta(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            extra = gm.graph.call_function(operator.add, (out.args[0][0], 1))
        out.args = ((extra,),)
        return PassResult(gm, True)

    with pytest.raises(PassContractError, match="t_no_meta.*has no meta\\['val'\\]"):
        run_stage(small_graph(), only("t_no_meta"))


def test_wrong_fake_metadata_is_caught_and_right_metadata_passes(temporary_passes):
    def add_one(claim_shape):
        def rewrite(gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                extra = gm.graph.call_function(operator.add, (out.args[0][0], 1))
            infer_meta(extra)
            if claim_shape:
                extra.meta["val"] = extra.meta["val"].new_empty(claim_shape)
            out.args = ((extra,),)
            return PassResult(gm, True)

        return rewrite

    temporary_passes(name="t_wrong_meta", stage="pre_grad", enabled=False)(add_one((9, 9)))
    temporary_passes(name="t_right_meta", stage="pre_grad", enabled=False)(add_one(None))
    with pytest.raises(PassContractError, match=r"says \('\(9, 9\)'"):
        run_stage(small_graph(), only("t_wrong_meta"))
    gm = run_stage(small_graph(), only("t_right_meta"))
    assert torch.equal(gm(torch.ones(3, 4))[0], torch.full((3, 4), 3.0))


def test_a_new_node_whose_shape_its_reader_cannot_take_is_caught_naming_the_pass(temporary_passes):
    @temporary_passes(name="t_misfit", stage="pre_grad", enabled=False)
    def transpose_the_activations(gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
        with gm.graph.inserting_after(relu):
            flipped = gm.graph.call_method("t", (relu,))
        infer_meta(flipped)  # its own metadata is right: [4, 3]
        for reader in [u for u in relu.users if u is not flipped]:
            reader.replace_input_with(relu, flipped)
        return PassResult(gm, True)

    gm = dynamo_graph(lambda x, w: torch.relu(x) @ w, torch.randn(3, 4), torch.randn(4, 5))
    with pytest.raises(PassContractError, match=r"t_misfit.*matmul: its op fails on its inputs' meta\['val'\]"):
        run_stage(gm, only("t_misfit"))


def test_modified_false_with_a_changed_graph_is_caught(temporary_passes):
    @temporary_passes(name="t_liar", stage="pre_grad", enabled=False)
    def liar(gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu)
        with gm.graph.inserting_after(relu):
            copy = gm.graph.call_function(torch.clone, (relu,))
        infer_meta(copy)
        relu.replace_all_uses_with(copy)
        copy.args = (relu,)
        return PassResult(gm, modified=False)

    with pytest.raises(PassContractError, match="returned modified=False but changed"):
        run_stage(small_graph(), only("t_liar"))


def test_the_compilers_cost_model_answers_what_the_pass_api_asks():
    from moe_ascend.compiler.planner.cost_model import CostModel as PlatformCostModel
    from moe_ascend.passes import CostModel

    assert isinstance(PlatformCostModel.for_platform(), CostModel)
    assert not isinstance(object(), CostModel)  # the check looks at the methods
