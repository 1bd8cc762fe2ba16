"""Options: every key and value checked, errors that list what is valid."""

import pytest

from moe_ascend.compiler.options import Options
from moe_ascend.kernels.errors import OptionError, TopologyError
from moe_ascend.runtime.topology import Topology


def test_defaults():
    opts = Options.from_user(None)
    assert (opts.target, opts.hierarchical_a2a, opts.overlap, opts.routing) == ("auto", "auto", "auto", "keep")
    assert opts.dump_dir is None and opts.passes == () and opts.disable == () and opts.profile is False


@pytest.mark.parametrize(
    "options, message",
    [
        ({"targt": "eager"}, r"unknown moe_ascend option\(s\) \['targt'\]; valid options are \['target'"),
        ({"target": "tpu"}, r"option 'target' is 'tpu'; valid values are \['auto', 'inductor', 'eager', 'ascend'\]"),
        ({"routing": "random"}, r"valid values are \['keep', 'affinity', 'node_limited'\]"),
        ({"routing": "node_limited"}, r"routing='node_limited' needs options\['routing_options'\]\['max_nodes'\]"),
        ({"routing": "node_limited", "routing_options": {"max_nodes": 0}}, r"\['max_nodes'\] is 0; give an int >= 1"),
        ({"routing": "affinity", "routing_options": {"gate": "fixed"}},
         r"\['gate'\] is 'fixed'; give one of \['learned', 'grap'\]"),
        ({"routing": "keep", "routing_options": {"max_nodes": 2}},
         r"has \['max_nodes'\], which routing='keep' does not take"),
        ({"overlap": 1}, r"a chunk count >= 2"),
        ({"overlap": True}, r"a chunk count >= 2"),
        ({"overlap": {"token_groups": 1}}, r"option 'overlap'\['token_groups'\] is 1; give an int >= 2, or 'auto'"),
        ({"overlap": {"groups": 2}}, r"option 'overlap' has \['groups'\]; a dict takes \['token_groups', "
                                     r"'changes_numerics'\]"),
        ({"overlap": {"token_groups": 2, "changes_numerics": "yes"}}, r"\['changes_numerics'\] is 'yes'; give True"),
        ({"hierarchical_a2a": "yes"}, r"'auto', True, False"),
        ({"topology": {"nodes": 2}}, r"\{'ranks_per_node': G\}"),
        ({"disable": [3]}, r"give pass names"),
        ({"dump_dir": 5}, r"give a folder path or None"),
        ({"profile": "yes"}, r"option 'profile' is 'yes'; valid values are True, False"),
    ],
)
def test_bad_options_say_what_is_valid(options, message):
    with pytest.raises(OptionError, match=message):
        Options.from_user(options)
    assert issubclass(OptionError, ValueError)


def test_good_options():
    opts = Options.from_user({"target": "eager", "overlap": 4, "hierarchical_a2a": False, "disable": "find_moe"})
    assert opts.overlap == 4 and opts.disable == ("find_moe",)
    assert (opts.token_groups, opts.overlap_chunks) == (1, 4)
    grouped = Options.from_user({"overlap": {"token_groups": 2}})
    assert (grouped.token_groups, grouped.overlap_chunks) == (2, False)
    assert grouped.overlap_option("changes_numerics") is False
    assert "('token_groups', 2)" in grouped.fingerprint()
    # "auto": the cost model chooses between token groups and chunks
    auto = Options.from_user({"overlap": "auto"})
    assert (auto.token_groups, auto.overlap_chunks, auto.overlap_option("changes_numerics")) == ("auto", "auto", False)
    auto = Options.from_user({"overlap": {"token_groups": "auto", "changes_numerics": True}})
    assert (auto.token_groups, auto.overlap_chunks, auto.overlap_option("changes_numerics")) == ("auto", "auto", True)


def test_dump_dir_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_ASCEND_DUMP_DIR", "/tmp/somewhere")
    assert Options.from_user({}).dump_dir == "/tmp/somewhere"
    assert Options.from_user({"dump_dir": "mine"}).dump_dir == "mine"


def test_topology_from_torchrun_environment():
    topo = Topology.detect(env={"WORLD_SIZE": "8", "RANK": "5", "LOCAL_WORLD_SIZE": "2"})
    assert (topo.nodes, topo.ranks_per_node, topo.node, topo.local_rank) == (4, 2, 2, 1)
    assert Topology.detect(ranks_per_node=4, env={"WORLD_SIZE": "8", "RANK": "5"}).nodes == 2


def test_topology_that_does_not_divide_the_world_is_an_error():
    with pytest.raises(TopologyError, match="world size 6 is not a whole number of nodes of 4 ranks"):
        Topology.detect(ranks_per_node=4, env={"WORLD_SIZE": "6", "RANK": "0"})


def test_hierarchy_groups_need_a_process_group_of_the_topologys_size():
    with pytest.raises(TopologyError, match="needs a default process group of 4 ranks, found no process group"):
        Topology(nodes=2, ranks_per_node=2).process_groups()


def test_ranks_of_a_node_and_peers_across_nodes():
    topo = Topology(nodes=3, ranks_per_node=2, rank=3)
    assert topo.node_ranks(1) == [2, 3] and topo.peer_ranks(1) == [1, 3, 5]


def test_hierarchy_groups_are_reused_and_let_go_with_the_default_group():
    # A gloo group still alive at interpreter exit can abort the process: they must not outlive the world.
    import weakref

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    topology = Topology(nodes=2, ranks_per_node=2, rank=1)
    groups = topology.process_groups()
    assert topology.process_groups() is groups
    assert dist.get_process_group_ranks(groups.intra) == [0, 1] and dist.get_process_group_ranks(groups.inter) == [1, 3]
    intra, inter = weakref.ref(groups.intra), weakref.ref(groups.inter)
    del groups
    dist.destroy_process_group()
    assert intra() is None and inter() is None
