"""The command line: ``plugins``, every shipped config parses, ``fit``/``validate`` from YAML
with a projector provided by the pip-installed example plugin, and clear name errors."""

from __future__ import annotations

import csv
import re
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
    """A 3-step tiny-LLaMA run without a logger, its config saved in ``tmp_path/run``."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 2, "val_check_interval": 3,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run"), "logger": False},
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
    assert printed["model"]["network"]["class_path"] in ("lit_lowrank.models.Llama", "lit_lowrank.models.Mixtral")
    assert "lowrank" in printed


@pytest.mark.slow
def test_fit_from_yaml_with_the_plugin_projector(installed_plugins, tmp_path, cache_dir):
    from lit_lowrank_hadamard import SRHTProjector

    cli = LowRankCLI(args=["fit", "--config", str(small_config(tmp_path, cache_dir, projector="srht",
                                                               projector_args={"oversample": 4}))])
    projectors = cli.trainer.optimizers[0].projectors
    assert len(projectors) == 14 and all(isinstance(p, SRHTProjector) for p in projectors.values())
    assert all(p.oversample == 4 for p in projectors.values())
    assert cli.trainer.global_step == 3
    assert "val/ppl" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_fit_a_mixture_of_experts_from_yaml(tmp_path, cache_dir):
    config = yaml.safe_load(small_config(tmp_path, cache_dir).read_text())
    config["model"]["network"] = {"class_path": "lit_lowrank.models.Mixtral",
                                  "init_args": {"size": "tiny", "vocab_size": VOCAB, "hidden_size": 32,
                                                "intermediate_size": 48, "num_heads": 2, "num_layers": 2,
                                                "num_experts": 4, "experts_per_token": 2}}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LowRankCLI(args=["fit", "--config", str(path)])
    optimizer = cli.trainer.optimizers[0]
    stacks = [g for g in optimizer.param_groups if g.get("layout") == "experts"]
    assert len(stacks) == 1 and len(stacks[0]["params"]) == 4  # gate_up_proj and down_proj of 2 layers
    left, right = optimizer.projectors[stacks[0]["params"][0]].bases()
    assert (left if right is None else right).shape[0] == 4  # one basis per expert
    assert cli.trainer.global_step == 3 and "val/ppl" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_validate_subcommand(tmp_path, cache_dir):
    cli = LowRankCLI(args=["validate", "--config", str(small_config(tmp_path, cache_dir))])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/ppl"].item() > 1.0


def test_unknown_component_lists_the_registered_names(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(small_config(tmp_path, cache_dir, projector="nope"))])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: lowrank: unknown projector 'nope'\. Registered: .*svd.*\n", capsys.readouterr().err)


BAD_LOWRANK = [
    ({"betas": [0.9, 1.5]}, r"betas must each be in \[0, 1\)"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"update_gap": 0}, "update_gap must be >= 1"),
    ({"side": "sideways"}, "side='sideways'"),
    ({"projector_args": {"quantizer": "int4x"}}, r"projector 'svd' .*unknown quantizer 'int4x'\. Registered: .*int"),
    ({"schedule": "lazy", "schedule_args": {"tresh": 0.5}}, r"schedule 'lazy' .*'tresh'.*accepts: gap, threshold"),
    ({"warmup": 10}, r"warmup of 10 steps is longer than the run \(3 optimizer steps\)"),
]


@pytest.mark.parametrize("print_config", [False, True], ids=["fit", "print_config"])
@pytest.mark.parametrize("lowrank, message", BAD_LOWRANK, ids=[str(o) for o, _ in BAD_LOWRANK])
def test_config_errors_are_one_line_before_anything_runs(tmp_path, cache_dir, capsys, lowrank, message, print_config):
    """Refused at parse time, with --print_config too, as one ``error:`` line (no traceback),
    exit code 2; nothing is printed or trained."""
    argv = ["fit", "--config", str(small_config(tmp_path, cache_dir, **lowrank))] + ["--print_config"] * print_config
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert re.fullmatch(f"error: lowrank: .*{message}.*\n", captured.err)
    assert "lowrank:" not in captured.out  # --print_config printed nothing


def test_fit_help_describes_every_lowrank_field_and_lists_registered_names(capsys):
    import dataclasses
    import re

    from lit_lowrank import registered
    from lit_lowrank.cli import main
    from lit_lowrank.lightning import LowRankConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("  --lowrank.enabled"):]
    blocks = re.split(r"^  (?=--)", options, flags=re.M)
    entries = {}
    for block in (block for block in blocks if block.startswith("--lowrank.")):
        words = block.split()
        name = words[0].split(".", 1)[1]
        while words and (words[0].startswith("--lowrank") or re.fullmatch(r"[A-Z_]+,?|[{\[].*[}\]],?", words[0])):
            words.pop(0)  # the option strings and metavars
        entries[name] = " ".join(words)
    for field in dataclasses.fields(LowRankConfig):
        description = entries[field.name].split("(type:")[0].strip()
        assert len(description) > 10, (field.name, description)
    for field, kind in [("projector", "projectors"), ("inner", "inner_optimizers"), ("method", "methods")]:
        listed = entries[field].replace("- ", "-")
        assert all(name in listed for name in registered(kind)), (field, listed)


GLUE_OVERLAYS = sorted((Path(__file__).parents[1] / "configs" / "glue").glob("*/*.yaml"))


@pytest.mark.parametrize("overlay", GLUE_OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_task_overlay_alone_names_the_base_config_to_put_first(overlay, capsys):
    """``--config configs/glue/minilm/rte.yaml`` alone: one ``error:`` line naming the base; the
    command it suggests parses."""
    base = overlay.parents[1] / f"{overlay.parent.name}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    suggested = f"--config {base} --config {overlay}"
    assert re.fullmatch(f"error: --config {re.escape(str(overlay))} is an overlay: .*data.init_args.*"
                        f"put its base config first: {re.escape(suggested)}\n", error)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *suggested.split(), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["task"] == overlay.stem


def test_an_option_giving_the_class_before_an_overlay_is_no_missing_base(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"init_args": {"batch_size": 3}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS[0]), "--data", "lit_lowrank.data.PretrainData", "--config", str(overlay),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["batch_size"] == 3


def fixed_folder_run(root: Path, cache_dir: Path, steps: int, *extra: str) -> list[str]:
    """``fit`` of a tiny LLaMA logging every step to ``root/run/version_0`` (a fixed version),
    checkpointing every 3 steps."""
    config = yaml.safe_load(small_config(root, cache_dir).read_text())
    config["trainer"].update(max_steps=steps, logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                      "init_args": {"save_dir": str(root), "name": "run",
                                                                    "version": 0}},
                             log_every_n_steps=1, enable_checkpointing=True, val_check_interval=steps,
                             callbacks=[{"class_path": "lit_lowrank.lightning.LastStepCheckpoint",
                                         "init_args": {"every_n_train_steps": 3}}])
    path = root / f"fixed{steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path), *extra]


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow
def test_a_second_run_into_a_fixed_version_folder_is_refused_unless_asked(tmp_path, cache_dir, capsys):
    run = tmp_path / "run" / "version_0"
    main(fixed_folder_run(tmp_path, cache_dir, 3))
    first = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    with pytest.raises(SystemExit) as exit_info:
        main(fixed_folder_run(tmp_path, cache_dir, 4))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: the run folder {run} holds config.yaml and metrics.csv of another run")
    assert "--trainer.logger.init_args.version" in error and "--overwrite true" in error and "--ckpt_path" in error
    assert {name: (run / name).read_bytes() for name in first} == first  # the first run's files, untouched
    main(fixed_folder_run(tmp_path, cache_dir, 4, "--overwrite", "true"))
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 4
    assert [int(row["step"]) for row in metric_rows(run) if row["train/loss"]] == list(range(4))


@pytest.mark.slow
def test_a_fit_resumed_in_its_own_folder_appends_to_its_metrics(tmp_path, cache_dir):
    run = tmp_path / "run" / "version_0"
    main(fixed_folder_run(tmp_path, cache_dir, 3))
    before = metric_rows(run)
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    main(fixed_folder_run(tmp_path, cache_dir, 6, "--ckpt_path", str(checkpoint)))
    after = metric_rows(run)
    assert [int(row["step"]) for row in after if row["train/loss"]] == list(range(6))  # each step once
    assert [{k: v for k, v in row.items() if v} for row in after[:len(before)]] == \
        [{k: v for k, v in row.items() if v} for row in before]  # the first part as the first run wrote it


def test_validate_twice_without_a_logger_into_one_root_dir_is_refused(tmp_path, cache_dir, capsys):
    config = str(small_config(tmp_path, cache_dir))
    main(["validate", "--config", config])
    saved = (tmp_path / "run" / "config.yaml").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", config, "--seed_everything", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "set another --trainer.default_root_dir" in error and "--ckpt_path" not in error  # no resume for validate
    assert (tmp_path / "run" / "config.yaml").read_bytes() == saved


def test_a_version_number_taken_meanwhile_moves_the_run_to_the_next(tmp_path, monkeypatch):
    """Two runs numbering their version at the same moment: the one that creates ``version_0``
    second gets ``version_1`` instead of sharing one metrics file."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lit_lowrank.cli import claim_log_dir

    real_numbering, numberings = CSVLogger._get_next_version, []

    def numbered_before_the_other_run_made_its_folder(self):
        numberings.append(self)
        return 0 if len(numberings) == 1 else real_numbering(self)

    monkeypatch.setattr(CSVLogger, "_get_next_version", numbered_before_the_other_run_made_its_folder)
    (tmp_path / "run" / "version_0").mkdir(parents=True)  # the other run's folder
    trainer = pl.Trainer(logger=CSVLogger(tmp_path, name="run"), accelerator="cpu", enable_progress_bar=False)
    assert claim_log_dir(trainer) == str(tmp_path / "run" / "version_1")
    assert (tmp_path / "run" / "version_1").is_dir() and len(numberings) == 2
