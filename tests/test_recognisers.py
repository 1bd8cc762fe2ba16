"""MoE code written by others is recognised: transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE,
gpt-oss, PhiMoE and DeepSeek-V3, a DeepSeek-style router written from scratch, and torchtitan-style EP."""

import json
import logging

import pytest
import torch
from checks import assert_matches_eager

transformers = pytest.importorskip("transformers")

ROLES = ("router", "dispatch", "experts", "combine")


def tiny_mixtral(experts_implementation):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    config._experts_implementation = experts_implementation
    return transformers.MixtralForCausalLM(config)


def tiny_qwen2_moe(experts_implementation):
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    config._experts_implementation = experts_implementation
    return transformers.Qwen2MoeForCausalLM(config)


TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=32)


def tiny_qwen3_moe(experts_implementation):
    config = transformers.Qwen3MoeConfig(**TINY, intermediate_size=32, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, head_dim=8)
    config._experts_implementation = experts_implementation
    return transformers.Qwen3MoeForCausalLM(config)


def tiny_olmoe(experts_implementation):
    config = transformers.OlmoeConfig(**TINY, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                      eos_token_id=None, pad_token_id=None)
    config._experts_implementation = experts_implementation
    return transformers.OlmoeForCausalLM(config)


def tiny_granitemoe(experts_implementation):
    config = transformers.GraniteMoeConfig(**TINY, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = experts_implementation
    return transformers.GraniteMoeForCausalLM(config)


def tiny_gpt_oss(experts_implementation):
    # top-k over the logits, softmax over the k chosen; biased experts (their bias added in place)
    config = transformers.GptOssConfig(**TINY, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                       head_dim=8, sliding_window=8)
    config._experts_implementation = experts_implementation
    return transformers.GptOssForCausalLM(config)


def tiny_phimoe(experts_implementation="grouped_mm"):
    # no top-k: sparsemixer picks each of its two experts with a max (a Gumbel sample of it while training)
    config = transformers.PhimoeConfig(**TINY, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = experts_implementation
    return transformers.PhimoeForCausalLM(config)


def tiny_deepseek_v3():
    # sigmoid router with a selection bias, top-2 of 8 inside the best 2 of 4 groups, routed_scaling_factor 2.5
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8,
        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, max_position_embeddings=32, routed_scaling_factor=2.5,
    )
    return transformers.DeepseekV3ForCausalLM(config)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


ROUTER_GATES = ["router_logits", "router_logits_1"]
BOTH = ["grouped_mm", "batched_mm"]  # transformers' two compilable experts; the routers' families share them
FAMILIES = [(tiny_mixtral, ROUTER_GATES, BOTH), (tiny_qwen2_moe, ROUTER_GATES, BOTH),
            (tiny_qwen3_moe, ROUTER_GATES, ["grouped_mm"]), (tiny_olmoe, ROUTER_GATES, ["grouped_mm"]),
            (tiny_granitemoe, ["linear_4", "linear_9"], ["grouped_mm"]), (tiny_gpt_oss, ROUTER_GATES, BOTH)]


@pytest.mark.parametrize("build,gates,experts_implementation",
                         [(build, gates, e) for build, gates, kinds in FAMILIES for e in kinds],
                         ids=[f"{e}-{build.__name__}" for build, _, kinds in FAMILIES for e in kinds])
def test_transformers_moe_logits_gradients_and_layers(build, gates, experts_implementation, tmp_path):
    torch.manual_seed(0)
    model = Logits(build(experts_implementation))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert_matches_eager(model, (ids,), {"target": "eager", "dump_dir": str(tmp_path)})
    assert_layers_with_every_role(json.loads((tmp_path / "summary.json").read_text()), gates)


def assert_layers_with_every_role(summary: dict, gates: list[str], roles=ROLES) -> None:
    assert [g["role"] for g in summary["graphs"]] == ["dynamo", "forward", "backward"]
    for graph in summary["graphs"]:
        assert [layer["layer"] for layer in graph["moe_layers"]] == list(range(len(gates))), graph["name"]
        assert all(layer[role] for layer in graph["moe_layers"] for role in roles)
    assert [layer["gate"] for layer in summary["graphs"][0]["moe_layers"]] == gates


def test_phimoe_sparsemixer_is_one_router_a_layer_in_training_and_exact_in_eval(tmp_path):
    torch.manual_seed(0)
    model = Logits(tiny_phimoe())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    # training samples each choice; the lowering's decompositions draw other random numbers than eager does
    torch.compile(model, backend="moe_ascend", options={"target": "eager", "dump_dir": str(tmp_path / "training")})(
        ids).sum().backward()
    assert_layers_with_every_role(json.loads((tmp_path / "training" / "summary.json").read_text()), ROUTER_GATES)
    torch._dynamo.reset()
    assert_matches_eager(model.eval(), (ids,), {"target": "eager", "dump_dir": str(tmp_path / "eval")})
    assert_layers_with_every_role(json.loads((tmp_path / "eval" / "summary.json").read_text()), ROUTER_GATES)


def test_transformers_shared_expert_stays_outside_the_routed_region(tmp_path):
    torch.manual_seed(0)
    model = torch.compile(Logits(tiny_qwen2_moe("grouped_mm")), backend="moe_ascend",
                          options={"target": "eager", "dump_dir": str(tmp_path)})
    model(torch.randint(0, 64, (2, 8)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    layer = summary["graphs"][0]["moe_layers"][0]
    region = {n for role in ROLES for n in layer[role]}
    assert layer["output"] == "final_hidden_states"
    assert not any("shared" in name for name in region)


def test_titan_style_expert_parallel_is_one_region_with_scalar_capture(single_rank_group, tmp_path):
    from models import TitanStyleMoE

    torch.manual_seed(0)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        assert_matches_eager(TitanStyleMoE(single_rank_group), (torch.randn(8, 16, requires_grad=True),),
                             {"target": "eager", "dump_dir": str(tmp_path)})
    summary = json.loads((tmp_path / "summary.json").read_text())
    (layer,) = summary["graphs"][0]["moe_layers"]
    (region,) = summary["graphs"][0]["regions"]
    exchanges = {n["role"] for n in region["nodes"] if "all_to_all_single" in n["op"]}
    assert exchanges == {"router", "dispatch", "combine"}  # the counts exchange is routing metadata
    assert layer["experts"]


def test_titan_style_with_a_graph_break_gets_one_warning_naming_it(single_rank_group, caplog):
    from models import TitanStyleMoE

    torch.manual_seed(0)
    model = torch.compile(TitanStyleMoE(single_rank_group), backend="moe_ascend", options={"target": "eager"})
    with caplog.at_level(logging.WARNING, logger="moe_ascend"):
        model(torch.randn(8, 16))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("moe_ascend")]
    assert len(said) == 1 and "graph break inside the layer" in said[0] and "capture_scalar_outputs" in said[0]


def test_transformers_deepseek_v3_logits_gradients_and_layers(tmp_path):
    torch.manual_seed(0)
    model = Logits(tiny_deepseek_v3())
    with torch.no_grad():  # a bias that changes the choice, as training leaves it
        for layer in model.model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    # canonicalise on: each router becomes one topk_sigmoid, and the model stays exact
    assert_matches_eager(model, (ids,), {"target": "eager", "dump_dir": str(tmp_path), "passes": ["canonicalise"]})
    assert_layers_with_every_role(json.loads((tmp_path / "summary.json").read_text()), ROUTER_GATES,
                                  roles=("router", "experts", "combine"))
    code = (tmp_path / "graph_0" / "pre_grad" / "04_canonicalise.py").read_text()
    assert code.count("= torch.ops.moe_ascend.topk_sigmoid.default(router_logits") == 2
    assert "torch.gather" not in code and "masked_fill" not in code


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_a_deepseek_style_router_written_from_scratch_is_one_layer_and_exact(target, tmp_path):
    from models import DeepSeekStyleMoE

    torch.manual_seed(0)
    assert_matches_eager(DeepSeekStyleMoE(), (torch.randn(6, 16, requires_grad=True),),
                         {"target": target, "dump_dir": str(tmp_path)})
    (layer,) = json.loads((tmp_path / "summary.json").read_text())["graphs"][0]["moe_layers"]
    assert layer["gate"] == "linear" and layer["topk"] == "topk_2"
