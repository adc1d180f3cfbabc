"""GradNormLoRP: the weight-norm chain rule computed plainly, fold-back, target selection (only V
is projected) and a few optimizer steps on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lit_lowrank import build_optimizer, select_targets
from lit_lowrank.transforms.weight_norm import apply_gradnorm, fold_gradnorm, is_gradnorm


TARGETS = ["attn", "mlp"]  # TinyNet has no repeated blocks: its targets are named


class TinyNet(nn.Module):
    """Two target linear layers ``attn``/``mlp`` and a head."""

    def __init__(self, dims=(12, 16, 10, 3)) -> None:
        super().__init__()
        self.attn = nn.Linear(dims[0], dims[1])
        self.mlp = nn.Linear(dims[1], dims[2])
        self.head = nn.Linear(dims[2], dims[3])

    def forward(self, x):
        return self.head(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))


def tiny_bert() -> nn.Module:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_apply_keeps_the_function_and_parametrizes_only_targets():
    torch.manual_seed(0)
    model, x = TinyNet().double(), torch.randn(5, 12, dtype=torch.float64)
    before = model(x)
    apply_gradnorm(model, TARGETS)
    assert is_gradnorm(model.attn) and is_gradnorm(model.mlp) and not is_gradnorm(model.head)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)


def test_gradients_follow_the_weight_norm_chain_rule():
    torch.manual_seed(0)
    model = apply_gradnorm(TinyNet().double(), TARGETS)
    originals = model.mlp.parametrizations.weight
    with torch.no_grad():  # move g and V off their initial W-consistent values
        originals.original0.copy_(torch.rand_like(originals.original0) + 0.5)
        originals.original1.copy_(torch.randn_like(originals.original1))
    x, target = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    nn.functional.mse_loss(model(x), target).backward()

    g, v = originals.original0.detach(), originals.original1.detach()
    norms = v.norm(dim=1, keepdim=True)
    weight = nn.Parameter(g * v / norms)  # the same layer as a plain weight: G = dL/dW
    plain = nn.functional.linear(torch.tanh(model.attn(x)), weight, model.mlp.bias)
    out = model.head(torch.tanh(plain))
    (grad_w,) = torch.autograd.grad(nn.functional.mse_loss(out, target), weight)

    grad_g = (grad_w * v).sum(dim=1, keepdim=True) / norms  # Salimans & Kingma, Eq. 3
    grad_v = g / norms * (grad_w - grad_g * v / norms)
    torch.testing.assert_close(originals.original0.grad, grad_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(originals.original1.grad, grad_v, rtol=1e-10, atol=1e-12)
    assert torch.allclose((grad_v * v).sum(dim=1), torch.zeros(10, dtype=torch.float64), atol=1e-12)


def test_only_the_direction_is_projected():
    model = apply_gradnorm(tiny_bert())
    low_rank, dense = select_targets(model)
    assert low_rank and all(name.endswith("parametrizations.weight.original1") for name in low_rank)
    directions = {n for n, p in model.named_parameters() if n.endswith("original1")}
    assert set(low_rank) == directions
    assert all(name in dense for name in (n.replace("original1", "original0") for n in directions))
    assert all(p.ndim == 2 and p.shape[1] == 1 for n, p in dense.items() if n.endswith("original0"))


@pytest.mark.parametrize("inner", ["adamw", "adamw8bit"])
def test_a_few_steps_reduce_the_loss(inner):
    torch.manual_seed(0)
    model = apply_gradnorm(TinyNet((12, 32, 24, 3)), TARGETS)
    x = torch.randn(64, 12)
    target = torch.tanh(x @ torch.randn(12, 3))
    optimizer = build_optimizer(model, targets=TARGETS, lr=0.02, rank=4, update_gap=10, scale=1.0, inner=inner,
                                inner_args={"min_8bit_size": 0} if inner == "adamw8bit" else {})
    v = model.mlp.parametrizations.weight.original1
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moment = optimizer.state[v]["exp_avg"]
    shape = tuple(moment["shape"].tolist()) if isinstance(moment, dict) else tuple(moment.shape)
    assert shape == (4, 32)  # V is 24×32: GaLore's std side projects the rows, R = Lᵀ G is r×n
    g = model.mlp.parametrizations.weight.original0
    assert optimizer.state[g]["exp_avg"].shape == g.shape  # magnitude: dense AdamW


def test_fold_back_gives_identical_outputs_and_plain_linear_weights():
    torch.manual_seed(0)
    model = apply_gradnorm(tiny_bert())
    optimizer = build_optimizer(model, lr=0.01, rank=4, update_gap=2)
    ids = torch.randint(0, 50, (4, 10))
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(3):  # g and V move away from their initial values
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fold_gradnorm(model)
    assert not any(parametrize_name in name for name, _ in model.named_parameters()
                   for parametrize_name in ("parametrizations", "original"))
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query.weight) is nn.Parameter and query.weight.shape == (32, 32)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    reloaded = tiny_bert()
    reloaded.load_state_dict(model.state_dict())  # folded checkpoints load into the plain model
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, after)


def test_no_matching_linear_raises():
    with pytest.raises(ValueError, match="targets"):
        apply_gradnorm(TinyNet(), targets=["nothing_here"])


def test_lightning_config_applies_gradnorm_before_the_optimizer():
    from lit_lowrank.lightning import LowRankConfig, LowRankModule

    module = LowRankModule(tiny_bert(), lowrank=LowRankConfig(gradnorm=True, rank=4))
    assert is_gradnorm(module.network.bert.encoder.layer[0].attention.self.query)
    optimizer = module.lowrank.build(module.network)
    (low_rank,) = [group for group in optimizer.param_groups if group["lowrank"]]
    assert low_rank["names"] and all(name.endswith("original1") for name in low_rank["names"])
    plain = LowRankModule(tiny_bert(), lowrank=LowRankConfig(rank=4))
    assert not is_gradnorm(plain.network.bert.encoder.layer[0].attention.self.query)


@pytest.mark.parametrize("overlay, inner", [("gradnorm.yaml", "adamw"), ("gradnorm_8bit.yaml", "adamw8bit")])
def test_glue_overlays_parse_on_top_of_a_task_config(overlay, inner, capsys):
    import yaml

    from lit_lowrank.cli import main

    configs = Path(__file__).parents[2] / "configs" / "glue"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(configs / "roberta.yaml"), "--config", str(configs / "roberta" / "mrpc.yaml"),
              "--config", str(configs / overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    lowrank = yaml.safe_load(capsys.readouterr().out)["lowrank"]
    task = {**yaml.safe_load((configs / "roberta.yaml").read_text())["lowrank"],
            **yaml.safe_load((configs / "roberta" / "mrpc.yaml").read_text()).get("lowrank", {})}
    assert lowrank["transforms"] == {"weight-norm": {}} and lowrank["inner"] == inner
    assert {k: lowrank[k] for k in ("rank", "scale", "update_gap", "lr", "targets")} == \
        {k: task[k] for k in ("rank", "scale", "update_gap", "lr", "targets")}


def test_apply_twice_is_harmless():
    model = apply_gradnorm(TinyNet(), TARGETS)
    v = model.attn.parametrizations.weight.original1
    apply_gradnorm(model, TARGETS)
    assert model.attn.parametrizations.weight.original1 is v and len(model.attn.parametrizations.weight) == 1


def test_existing_project_path_refuses_gradnorm_on_a_plain_model():
    from lit_lowrank.lightning import LowRankConfig
    from lit_lowrank.lightning.optimizer_conversion import convert_optimizers

    config = LowRankConfig(gradnorm=True, rank=4)
    plain = tiny_bert()
    with pytest.raises(ValueError, match="apply_gradnorm"):
        convert_optimizers(plain, [torch.optim.AdamW(plain.parameters())], [], config)
    model = apply_gradnorm(tiny_bert())
    (converted,) = convert_optimizers(model, [torch.optim.AdamW(model.parameters())], [], config)
    lowrank = [p for group in converted.param_groups if group["lowrank"] for p in group["params"]]
    directions = [p for n, p in model.named_parameters() if n.endswith("original1")]
    assert len(lowrank) == len(directions) and all(any(p is d for d in directions) for p in lowrank)
