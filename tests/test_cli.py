"""The command line: ``plugins``, every shipped config parses, ``fit``/``validate`` from YAML
with a projector provided by the pip-installed example plugin, and clear name errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_lowrank import plugins
from lit_lowrank.cli import LowRankCLI, main
from lit_lowrank.data.pretrain import prepare_embedded

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
VOCAB = 512


@pytest.fixture
def installed_plugins(monkeypatch):
    monkeypatch.delenv(plugins.DISABLE_ENTRYPOINTS_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "lit_lowrank_cache"
    prepare_embedded(path, VOCAB)
    return path


def small_config(tmp_path: Path, cache_dir: Path, **lowrank) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 2, "val_check_interval": 3,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path), "logger": False},
        "model": {"network": {"class_path": "lit_lowrank.models.Llama",
                              "init_args": {"size": "tiny", "vocab_size": VOCAB, "hidden_size": 32,
                                            "intermediate_size": 64, "num_heads": 2, "num_layers": 2}}},
        "lowrank": {"rank": 4, "update_gap": 2, **lowrank},
        "data": {"class_path": "lit_lowrank.data.PretrainData",
                 "init_args": {"seq_len": 32, "batch_size": 4, "vocab_size": VOCAB, "cache_dir": str(cache_dir)}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_plugins_lists_builtin_and_installed(installed_plugins, capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    assert "svd" in out
    assert "srht" in out and "lit-lowrank-hadamard" in out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["network"]["class_path"] == "lit_lowrank.models.Llama"
    assert "lowrank" in printed


def test_fit_from_yaml_with_the_plugin_projector(installed_plugins, tmp_path, cache_dir):
    from lit_lowrank_hadamard import SRHTProjector

    cli = LowRankCLI(args=["fit", "--config", str(small_config(tmp_path, cache_dir, projector="srht",
                                                               projector_args={"oversample": 4}))])
    projectors = cli.trainer.optimizers[0].projectors
    assert len(projectors) == 14 and all(isinstance(p, SRHTProjector) for p in projectors.values())
    assert all(p.oversample == 4 for p in projectors.values())
    assert cli.trainer.global_step == 3
    assert "val/ppl" in cli.trainer.callback_metrics


def test_validate_subcommand(tmp_path, cache_dir):
    cli = LowRankCLI(args=["validate", "--config", str(small_config(tmp_path, cache_dir))])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/ppl"].item() > 1.0


def test_unknown_component_lists_the_registered_names(tmp_path, cache_dir):
    with pytest.raises(SystemExit, match="unknown projector 'nope'.*Registered: .*svd"):
        main(["fit", "--config", str(small_config(tmp_path, cache_dir, projector="nope"))])
