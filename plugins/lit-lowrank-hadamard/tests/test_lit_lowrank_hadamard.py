"""The srht projector: the transform against an explicit Hadamard matrix, exact recovery of
low-rank gradients, near-optimal capture otherwise, reproducibility, and entry-point loading."""

from __future__ import annotations

import pytest
import torch

import lit_lowrank
from lit_lowrank import plugins
from lit_lowrank.testing import check_projector
from lit_lowrank_hadamard import SRHTProjector, fwht


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def low_rank_matrix(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)


def test_fwht_is_multiplication_by_the_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(16))
    torch.testing.assert_close(fwht(fwht(x)), x)  # orthonormal and symmetric
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("shape, side", [((40, 24), "std"), ((24, 40), "std"), ((30, 50), "full")])
def test_recovers_the_exact_subspace_of_a_low_rank_gradient(shape, side):
    grad = low_rank_matrix(*shape, rank=4)  # non-power-of-two sizes exercise the padding
    projector = SRHTProjector(4, side=side, oversample=2, power_iters=0)
    projector.refresh(grad)
    torch.testing.assert_close(projector.project_back(projector.project(grad)), grad)
    for basis in projector.bases():
        if basis is not None:
            torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=grad.dtype))


def test_captures_nearly_the_optimal_energy_of_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    singular = 0.7 ** torch.arange(48, dtype=torch.float64)
    grad = u[:, :48] * singular @ v.T
    rank = 6
    projector = SRHTProjector(rank, oversample=8, power_iters=1)
    projector.refresh(grad)
    captured = projector.project_back(projector.project(grad)).norm() ** 2
    optimal = (singular[:rank] ** 2).sum()  # Eckart–Young
    assert captured <= optimal * (1 + 1e-9)
    assert captured >= 0.999 * optimal


def test_same_seed_same_basis_and_state_round_trip():
    grad = torch.randn(20, 33, generator=torch.Generator().manual_seed(2))
    first, second = SRHTProjector(3, seed=7), SRHTProjector(3, seed=7)
    first.refresh(grad)
    second.refresh(grad)
    torch.testing.assert_close(first.bases()[1], second.bases()[1])
    restored = SRHTProjector(3, seed=7)
    restored.load_state_dict(first.state_dict())
    torch.testing.assert_close(restored.project(grad), first.project(grad))


@pytest.fixture
def installed_plugins(monkeypatch):
    """The plugin manager as a user gets it: built-ins plus installed entry points."""
    monkeypatch.delenv(plugins.DISABLE_ENTRYPOINTS_ENV, raising=False)
    plugins.reset()
    yield plugins
    plugins.reset()


def test_registered_through_the_entry_point(installed_plugins):
    entry = installed_plugins.registered("projectors")["srht"]
    assert entry.component is SRHTProjector
    assert entry.provider.startswith("lit-lowrank-hadamard")


def test_trains_inside_lowrank_optimizer_by_name(installed_plugins):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("mlp", torch.nn.Linear(24, 16, bias=False))
    x, y = torch.randn(64, 24), torch.randn(64, 16)
    optimizer = lit_lowrank.build_optimizer(model, targets=["mlp"], projector="srht", rank=4, lr=0.05,
                                            update_gap=5, scale=1.0)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert isinstance(optimizer.projectors[model.mlp.weight], SRHTProjector)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("options", [{}, {"oversample": 2, "power_iters": 0}])
def test_keeps_the_projector_contract(options):
    """lit_lowrank's conformance kit: shapes, orthonormal bases, state round trip, bitwise resume."""
    check_projector(SRHTProjector, **options)


def test_freeze_bias_keeps_the_transform_contract():
    from lit_lowrank.testing import check_transform
    from lit_lowrank_hadamard import FreezeBias

    check_transform(FreezeBias)


def test_a_yaml_config_names_the_plugins_transform(installed_plugins, tmp_path, capsys):
    import yaml

    from lit_lowrank.cli import main

    config = {"model": {"network": {"class_path": "lit_lowrank.models.Llama",
                                    "init_args": {"size": "tiny", "vocab_size": 64, "hidden_size": 32,
                                                  "intermediate_size": 64, "num_heads": 2, "num_layers": 2}}},
              "lowrank": {"rank": 4, "transforms": {"freeze-bias": {}}},
              "data": {"class_path": "lit_lowrank.data.PretrainData",
                       "init_args": {"seq_len": 32, "batch_size": 4, "vocab_size": 64,
                                     "cache_dir": str(tmp_path)}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["lowrank"]["transforms"] == {"freeze-bias": {}}


def test_one_training_step_keeps_the_target_biases_and_trains_the_rest(installed_plugins):
    from lit_lowrank.lightning import LowRankConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("mlp", torch.nn.Linear(24, 16))
    model.add_module("head", torch.nn.Linear(16, 4))
    config = LowRankConfig(targets=["mlp"], rank=4, lr=0.05, transforms={"freeze-bias": {}})
    config.prepare(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = config.build(model)
    x, y = torch.randn(8, 24), torch.randn(8, 4)
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {"mlp.weight", "head.weight", "head.bias"}
    assert not model.mlp.bias.requires_grad


def test_the_plugins_command_summarises_each_of_the_modules_components_by_its_class(installed_plugins, capsys):
    from lit_lowrank.commands import print_plugins

    print_plugins()
    lines = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()}
    assert "Q-GaLore" in lines["transforms", "int-weights"]
    assert "biases of the low-rank target layers" in lines["transforms", "freeze-bias"]
    assert "SRHT" in lines["projectors", "srht"]
