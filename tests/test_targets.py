"""Default targets chosen by structure on real model classes (HF LLaMA and BERT, nn.Transformer,
a Meta-style LLaMA written here), tied weights updated once, patterns as an override."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer, select_targets
from lit_lowrank.targets import classify
from lit_lowrank.transforms.int_weights import QuantizedLinear, quantize_linear_weights
from lit_lowrank.transforms.weight_norm import apply_gradnorm, is_gradnorm

transformers = pytest.importorskip("transformers")


def layer_free(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def tiny_llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, **overrides)
    return transformers.LlamaForCausalLM(config)


class MetaBlock(nn.Module):
    """A Meta/torchtitan LLaMA block: ``attention.w{q,k,v,o}``, ``feed_forward.w{1,2,3}``."""

    def __init__(self, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.attention = nn.Module()
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, name, nn.Linear(dim, dim, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, hidden, bias=False)
        self.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, hidden, bias=False)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)


class MetaLlama(nn.Module):
    def __init__(self, layers: str = "dict", vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        blocks = [MetaBlock(dim) for _ in range(2)]
        self.layers = nn.ModuleDict({str(i): b for i, b in enumerate(blocks)}) if layers == "dict" \
            else nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


META_MATRICES = {f"layers.N.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")} | \
    {f"layers.N.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}


@pytest.mark.parametrize("layers", ["dict", "list"])
def test_meta_llama_projects_every_block_matrix_never_the_output_head(layers):
    low_rank, dense = select_targets(MetaLlama(layers))
    assert layer_free(low_rank) == META_MATRICES and len(low_rank) == 2 * 7
    assert "output.weight" in dense and "tok_embeddings.weight" in dense


def test_nn_transformer_projects_in_projections_out_projections_and_feed_forward():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=24)
    low_rank, dense = select_targets(model)
    expected = {f"encoder.layers.N.{m}" for m in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                                  "linear1.weight", "linear2.weight")}
    expected |= {f"decoder.layers.N.{m}" for m in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                                   "multihead_attn.in_proj_weight", "multihead_attn.out_proj.weight",
                                                   "linear1.weight", "linear2.weight")}
    assert layer_free(low_rank) == expected
    assert all(p.ndim == 1 for p in dense.values())  # biases and norms only


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.out = nn.Linear(8, 8), nn.Linear(8, 2)


def test_a_sequential_pipeline_makes_blocks_of_its_repeated_classes_only():
    model = nn.Sequential(ConvBlock(), MetaBlock(8), MetaBlock(8), Head())
    low_rank, _ = select_targets(model)
    assert {n.split(".")[0] for n in low_rank} == {"1", "2"}


def test_separate_qkv_attention_projects_each_projection():
    block = nn.ModuleList([nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=4))])
    low_rank, _ = select_targets(block)
    assert set(low_rank) == {f"0.0.{m}" for m in ("q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                  "out_proj.weight")}


def test_hf_llama_and_bert_leave_embeddings_heads_and_poolers_dense():
    low_rank, dense = select_targets(tiny_llama())
    assert len(low_rank) == 2 * 7 and {"lm_head.weight", "model.embed_tokens.weight"} <= set(dense)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_labels=3)
    low_rank, dense = select_targets(transformers.BertForSequenceClassification(config))
    assert layer_free(low_rank) == {f"bert.encoder.layer.N.{m}.weight" for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}
    reasons = {c.name: c.reason for c in classify(transformers.BertForSequenceClassification(config))}
    assert reasons["classifier.weight"] == reasons["bert.pooler.dense.weight"] == "outside the blocks"
    assert reasons["bert.embeddings.word_embeddings.weight"] == "embedding"


def test_gpt2_conv1d_layers_are_linear_layers():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    low_rank, _ = select_targets(transformers.GPT2LMHeadModel(config))
    assert layer_free(low_rank) == {f"transformer.h.N.{m}.weight" for m in ("attn.c_attn", "attn.c_proj",
                                                                            "mlp.c_fc", "mlp.c_proj")}


def test_a_head_tied_to_the_embedding_is_never_projected_even_when_named():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="lm_head matches targets.*embedding"):
        low_rank, dense = select_targets(model, targets=["lm_head", "q_proj"])
    assert layer_free(low_rank) == {"model.layers.N.self_attn.q_proj.weight"}
    assert "model.embed_tokens.weight" in dense
    reasons = {c.name: c.reason for c in classify(model)}
    assert reasons["model.embed_tokens.weight"] == "embedding"


def test_a_string_where_a_list_is_meant_is_refused():
    from lit_lowrank.lightning import LowRankConfig

    with pytest.raises(TypeError, match=r"targets=\['q_proj'\]"):
        select_targets(tiny_llama(), "q_proj")
    with pytest.raises(TypeError, match=r"exclude=\['mlp'\]"):
        LowRankConfig(exclude="mlp")


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.proj = nn.Linear(4, 4)


def test_conv_kernels_are_projected_only_where_targets_name_them():
    model = nn.ModuleList([ConvBlock(), ConvBlock()])
    low_rank, _ = select_targets(model)
    assert set(low_rank) == {"0.proj.weight", "1.proj.weight"}
    choices = {c.name: c for c in classify(model)}
    assert choices["0.conv.weight"].reason == "a conv kernel (name it in targets to project it)"
    named = {c.name: c for c in classify(model, targets=["conv", "proj"])}
    assert named["0.conv.weight"].reason is None and named["0.conv.weight"].layout == "kernel"
    assert named["0.proj.weight"].layout == "matrix"


def test_stacked_experts_are_targets_like_linear_layers_and_a_router_is_not():
    class Experts(nn.Module):  # transformers' fused-experts layout
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 6, 3))
            self.down_proj = nn.Parameter(torch.randn(4, 3, 3))

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

    class MoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.experts = Router(), Experts()

    model = nn.ModuleList([MoeBlock(), MoeBlock()])
    choices = {c.name: c for c in classify(model)}
    assert choices["0.experts.gate_up_proj"].reason is None and choices["0.experts.gate_up_proj"].layout == "experts"
    assert choices["1.experts.down_proj"].layout == "experts"
    assert choices["0.gate.weight"].reason == "not a linear layer"
    optimizer = build_optimizer(model, rank=2)
    lowrank = [g for g in optimizer.param_groups if g["lowrank"]]
    assert [(g.get("layout"), len(g["params"])) for g in lowrank] == [("experts", 4)]


def test_a_matched_4d_tensor_outside_a_convolution_is_reported_not_silently_dense():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 2, 2, 2))

    model = nn.ModuleList([ConvBlock(), Odd()])
    with pytest.warns(UserWarning, match=r"1 matches targets.*4-D, not a matrix"):
        select_targets(model, targets=["1"])


def test_frozen_weights_are_left_out_unless_asked():
    model = MetaLlama()
    model.layers["0"].attention.wq.weight.requires_grad_(False)
    low_rank, dense = select_targets(model)
    assert "layers.0.attention.wq.weight" not in low_rank | dense and len(low_rank) == 13
    low_rank, _ = select_targets(model, include_frozen=True)
    assert "layers.0.attention.wq.weight" in low_rank
    assert {c.name: c.reason for c in classify(model)}["layers.0.attention.wq.weight"] == "frozen"


def test_exclude_patterns_and_target_patterns_override_the_structure():
    model = MetaLlama()
    low_rank, _ = select_targets(model, exclude=["feed_forward"])
    assert layer_free(low_rank) == {n for n in META_MATRICES if "attention" in n}
    low_rank, _ = select_targets(model, targets=["output"])  # named: the user's choice
    assert set(low_rank) == {"output.weight"}


class SharedBlock(nn.Module):
    """Two linear layers sharing one weight (e.g. tied encoder/decoder projections)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 8, bias=False), nn.Linear(12, 8, bias=False)
        self.b.weight = self.a.weight


def test_a_weight_shared_by_two_target_layers_is_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.ModuleList([SharedBlock()])
    weight = model[0].a.weight
    low_rank, _ = select_targets(model)
    assert list(low_rank) == ["0.a.weight"]
    options = dict(lr=0.1, rank=2, update_gap=10, scale=1.0)
    optimizer = build_optimizer(model, targets=[r"0\.a", r"0\.b"], **options)  # both users named
    x = torch.randn(5, 12)
    (model[0].a(x).square().sum() + model[0].b(x).sum()).backward()
    # reference: one LowRankOptimizer step of a copy of the weight, with the same gradient
    copy = nn.Parameter(weight.detach().clone())
    copy.grad = weight.grad.clone()
    LowRankOptimizer([{"params": [copy], "lowrank": True}], **options).step()
    optimizer.step()
    assert optimizer.refresh_count == 1
    torch.testing.assert_close(weight.detach(), copy.detach(), rtol=0, atol=0)


def test_gradnorm_and_quantized_weights_use_the_same_selection():
    model = apply_gradnorm(MetaLlama())
    assert is_gradnorm(model.layers["1"].feed_forward.w2) and not is_gradnorm(model.output)
    low_rank, _ = select_targets(model)
    assert len(low_rank) == 14 and all(n.endswith("original1") for n in low_rank)
    model = MetaLlama()
    replaced = quantize_linear_weights(model)
    assert layer_free(f"{name}.weight" for name in replaced) == META_MATRICES
    assert isinstance(model.layers["0"].attention.wq, QuantizedLinear) and type(model.output) is nn.Linear
    assert len(select_targets(model)[0]) == 14  # the quantized layers are selected again
    with pytest.raises(ValueError, match="nn.Linear layers only.*MultiheadAttention.*exclude"):
        quantize_linear_weights(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                               dim_feedforward=8))


class ConvNet(nn.Module):
    """Conv blocks in a ModuleList, a stem and a linear head: no linear layer inside the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.layers = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)) for _ in range(2)])
        self.fc = nn.Linear(4, 10)


class OneMoeLayer(nn.Module):
    """Stacked experts and a router, not inside repeated blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 6, 3))
        self.experts.down_proj = nn.Parameter(torch.randn(4, 3, 3))
        self.router = nn.Linear(3, 4)


def test_no_structural_target_says_what_the_selection_looks_for_and_what_the_model_has():
    with pytest.raises(ValueError) as conv_error:
        build_optimizer(ConvNet(), rank=2)
    message = str(conv_error.value)
    assert "linear layers and stacked expert weights (3-D) inside repeated blocks" in message
    kernels = [n for n, p in ConvNet().named_parameters() if p.ndim == 4]
    assert f"{len(kernels)} conv kernels, projected only where `targets` names them ({', '.join(kernels)})" in message
    assert "1 linear layer outside the blocks (fc.weight)" in message
    with pytest.raises(ValueError) as moe_error:
        build_optimizer(OneMoeLayer(), rank=2)
    experts = [n for n, p in OneMoeLayer().named_parameters() if p.ndim == 3]
    assert f"{len(experts)} stacked expert weights outside the blocks ({', '.join(experts)})" in str(moe_error.value)
    assert "1 embedding (embed.weight)" in str(moe_error.value)


@pytest.mark.parametrize("model", [ConvNet, OneMoeLayer])
def test_the_patterns_the_error_suggests_project_the_weights_it_lists(model):
    with pytest.raises(ValueError) as error:
        build_optimizer(model(), rank=2)
    suggested = ast.literal_eval(re.search(r"e\.g\. (\[.*\])\.$", str(error.value)).group(1))
    low_rank, _ = select_targets(model(), targets=suggested)
    expected = {n for n, p in model().named_parameters()
                if p.ndim >= 2 and not n.startswith("embed")}  # every weight but the embedding
    assert set(low_rank) == expected


@pytest.mark.parametrize("key", ["targets", "exclude"])
def test_patterns_given_as_a_generator_are_refused_naming_the_fix(key):
    from lit_lowrank.lightning import LowRankConfig

    with pytest.raises(TypeError, match=rf"{key} is a generator.*{key}=list\(\.\.\.\)"):
        build_optimizer(MetaLlama(), rank=2, **{key: (p for p in ["wq", "wk"])})
    with pytest.raises(TypeError, match=rf"{key} is a generator"):
        LowRankConfig(**{key: (p for p in ["wq"])})
    with pytest.raises(TypeError, match=rf"{key} holds \[3\]"):
        select_targets(MetaLlama(), **{key: ["wq", 3]})


def test_patterns_in_any_collection_select_what_the_list_selects():
    as_list = set(select_targets(MetaLlama(), targets=["wq", "w1"], exclude=["layers.1"])[0])
    assert as_list == {"layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"}
    for kind in (tuple, set, frozenset):
        low_rank, _ = select_targets(MetaLlama(), targets=kind(["wq", "w1"]), exclude=kind(["layers.1"]))
        assert set(low_rank) == as_list
