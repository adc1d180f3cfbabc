"""The Lightning command line: ``python -m lit_lowrank {fit,validate,test} --config x.yaml`` (and
``--print_config``) runs :class:`LowRankCLI`, a ``LightningCLI`` whose YAML has a top-level ``lowrank:`` section
(:class:`~lit_lowrank.lightning.LowRankConfig`) naming components by their registered names.

The ``lowrank:`` section is checked right after parsing (and before ``--print_config`` prints
it): a value the optimizer would refuse stops the CLI with one ``error: ...`` line, exit code 2.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_lowrank.extras import require

require("lightning", "lightning", "jsonargparse")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from fsspec.utils import get_protocol  # noqa: E402
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from lightning.fabric.utilities.cloud_io import get_filesystem  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from lit_lowrank import plugins
from lit_lowrank.commands import main  # noqa: F401 — ``lit_lowrank.cli.main``, as before
from lit_lowrank.lightning import LowRankConfig, LowRankModule
from lit_lowrank.lightning.progress import progress_bar


class ConfigError(Exception):
    """A config value that the checks refuse; :func:`run_cli` prints it as one ``error:`` line."""


CONFIG_ERRORS = (ValueError, TypeError, plugins.UnknownComponentError)


def check_lowrank_section(config: Any) -> None:
    """Build the :class:`LowRankConfig` of a parsed (sub)command config, which runs the
    optimizer's own checks, and check the warm-up against ``trainer.max_steps`` when set;
    raises :class:`ConfigError`."""
    section = config.get("lowrank") if config is not None else None
    if section is None:
        return
    values = section.as_dict() if hasattr(section, "as_dict") else dict(section)
    try:
        lowrank = LowRankConfig(**{k: v for k, v in values.items() if not k.startswith("__")})
        max_steps = (config.get("trainer") or {}).get("max_steps")
        if isinstance(max_steps, int) and max_steps > 0:  # the run is at most max_steps long
            lowrank.warmup_steps(max_steps)
    except CONFIG_ERRORS as exc:
        raise ConfigError(f"lowrank: {exc}") from exc


def check_overlays(args: list[str]) -> None:
    """Refuse, naming the base to put first, a ``--config`` overlay given without its base: a
    file that sets a class's ``init_args`` (``data: {init_args: {task: rte}}``) where no earlier
    ``--config`` or option gave that class (``configs/glue/minilm/rte.yaml`` alone). jsonargparse
    would fail on it with ``Given value: {'init_args': ...}``. Raises :class:`ConfigError`."""
    given: set[str] = set()  # sections whose class an earlier config or option set
    for option, value in _options(args):
        if option != "config":
            given.add(option.split(".init_args")[0])
            continue
        sections = dict(_class_sections(_read_yaml(value)))
        lacking = [path for path, has_class in sections.items() if not has_class and path not in given]
        if lacking:
            raise ConfigError(_overlay_message(value, lacking))
        given.update(sections)


def _overlay_message(overlay: str, lacking: list[str]) -> str:
    """The error for an overlay whose ``lacking`` sections have no class yet."""
    what = ", ".join(f"{path}.init_args" for path in lacking)
    base = Path(overlay).parent.with_suffix(".yaml")  # configs/glue/minilm/rte.yaml → configs/glue/minilm.yaml
    first = (f"put its base config first: --config {base} --config {overlay}" if base.is_file()
             else f"put the config that sets {lacking[0]}.class_path before it")
    return f"--config {overlay} is an overlay: it sets {what} without the class_path its base config gives; {first}"


def _options(args: list[str]) -> Iterator[tuple[str, str | None]]:
    """``(option name without --, value)`` of each ``--option value`` / ``--option=value`` in ``args``."""
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, equals, value = arg[2:].partition("=")
        following = args[index + 1] if index + 1 < len(args) else None
        yield name, value if equals else following


def _read_yaml(path: str | None) -> Any:
    """The parsed YAML file at ``path``; None if there is none or it is no valid YAML (the
    parser reports those)."""
    try:
        return yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return None


def _class_sections(config: Any, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """``(dotted path, has class_path)`` of each class given in a config dict (a dict with
    ``class_path`` or ``init_args``), nested classes in ``init_args`` included."""
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and ("class_path" in value or "init_args" in value):
            yield path, "class_path" in value
            yield from _class_sections(value.get("init_args"), f"{path}.")
        else:
            yield from _class_sections(value, f"{path}.")


class LowRankArgumentParser(LightningArgumentParser):
    """Checks the ``lowrank:`` section before dumping a config: jsonargparse's ``--print_config``
    prints before it validates (and never builds the dataclass)."""

    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
        check_lowrank_section(cfg)
        return super().dump(cfg, *args, **kwargs)


DESCRIPTION = ("Train with low-rank gradient optimizers (GaLore, Fira, APOLLO, Q-GaLore, ...). "
               "`python -m lit_lowrank plugins` lists the registered projectors, rules, inner "
               "optimizers, schedules, quantizers and methods.")


class LowRankCLI(LightningCLI):
    """``LightningCLI`` for :class:`LowRankModule` and any ``LightningDataModule``.

    YAML layout::

        trainer: {...}                    # lightning.pytorch.Trainer arguments
        model:
          network: {class_path: lit_lowrank.models.Llama, init_args: {size: 60m}}
          task: {class_path: lit_lowrank.lightning.CausalLM}
        lowrank: {rank: 128, projector: svd, update_gap: 200, scale: 0.25, lr: 0.01}
        data: {class_path: lit_lowrank.data.PretrainData, init_args: {...}}

    ``lowrank:`` is linked into ``model.lowrank``. Plugins are loaded before the parser is
    built, so a misspelt component name fails at parse time with the registered names listed.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        plugins.plugin_manager()
        save_config = {"overwrite": False, **(kwargs.pop("save_config_kwargs", None) or {})}
        self.overwrite_default = bool(save_config["overwrite"])  # the --overwrite default
        self.config_filename = save_config.get("config_filename", "config.yaml")
        kwargs = {"subclass_mode_data": True, "auto_configure_optimizers": False,
                  "trainer_defaults": {"callbacks": [progress_bar()]},
                  "parser_class": LowRankArgumentParser,
                  "save_config_kwargs": {**save_config, "overwrite": True},  # claim_run_folder decides
                  "parser_kwargs": {"prog": "python -m lit_lowrank", "description": DESCRIPTION}, **kwargs}
        super().__init__(LowRankModule, pl.LightningDataModule, args=args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Refuse an overlay config given without its base (:func:`check_overlays`), then parse."""
        if args is None or isinstance(args, list):
            check_overlays(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_dataclass_arguments(LowRankConfig, "lowrank")
        parser.add_argument("--overwrite", type=bool, default=self.overwrite_default,
                            help="Run in a log folder that holds another run's config.yaml or metrics.csv, "
                                 "replacing them (by default such a run is refused; a fit resumed from a "
                                 "checkpoint inside its own folder appends to it).")
        parser.link_arguments("lowrank", "model.lowrank", apply_on="instantiate")
        list_registered_names(parser)

    def before_instantiate_classes(self) -> None:
        """Refuse a bad ``lowrank:`` section before the model is built or data prepared; keep
        the progress bar out of a run that disables it or brings its own."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_lowrank_section(config)
        trainer = config.get("trainer") or {}
        own = [c for c in trainer.get("callbacks") or [] if "ProgressBar" in str(c.get("class_path", ""))]
        if trainer.get("enable_progress_bar") is False or own:
            self.trainer_defaults = {k: v for k, v in self.trainer_defaults.items() if k != "callbacks"}

    def instantiate_classes(self) -> None:
        """Build the trainer, model and data; a value a constructor refuses (a placeholder
        ``data_dir``, ...) stops with that constructor's own message, not jsonargparse's dump of
        every union member it tried."""
        try:
            super().instantiate_classes()
        except ValueError as exc:
            cause: BaseException = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ConfigError(str(cause)) from exc

    def before_fit(self) -> None:
        """Claim the run's log folder before anything is trained (:meth:`claim_run_folder`)."""
        self.claim_run_folder()

    before_validate = before_test = before_predict = before_fit

    def claim_run_folder(self) -> None:
        """Refuse a run whose log folder holds another run's config or metrics (a fixed
        ``version``, ``logger: false`` with a reused ``default_root_dir``), unless ``--overwrite
        true``; a fit resumed from a checkpoint inside that folder appends to its metrics. An
        auto-numbered ``version_N`` taken by a run started at the same moment moves to the next
        number. Runs on the launching process only (DDP's other ranks re-run the CLI)."""
        config = self.config[self.subcommand]
        if config.get("overwrite") or not self.trainer.is_global_zero:
            return
        log_dir = claim_log_dir(self.trainer)
        checkpoint = config.get("ckpt_path")
        resumed = self.subcommand == "fit" and checkpoint is not None and resumes_in(checkpoint, log_dir)
        fs = get_filesystem(log_dir)
        held = [name for name in (self.config_filename, METRICS) if fs.isfile(os.path.join(log_dir, name))]
        if held and not resumed:
            raise ConfigError(run_folder_message(log_dir, held, self.trainer.logger is None, self.subcommand == "fit"))
        if resumed and isinstance(self.trainer.logger, CSVLogger):
            keep_metrics(self.trainer.logger, checkpoint)


METRICS = "metrics.csv"
"""The file CSVLogger writes a run's metrics to (and deletes when it opens a folder holding one)."""


def claim_log_dir(trainer: pl.Trainer) -> str:
    """``trainer.log_dir``, created now when the logger numbers its versions itself (CSV,
    TensorBoard): ``mkdir`` is atomic, so a run started at the same moment that took the same
    ``version_N`` moves this one to the next number instead of interleaving one metrics file."""
    logger = trainer.logger
    numbered = isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None
    log_dir = trainer.log_dir
    while numbered and get_protocol(log_dir) == "file":
        os.makedirs(os.path.dirname(log_dir), exist_ok=True)
        try:
            os.mkdir(log_dir)
            break
        except FileExistsError:
            logger._version = None  # taken since the logger numbered it: the next free number
            log_dir = trainer.log_dir
    return log_dir


def resumes_in(checkpoint: str, log_dir: str) -> bool:
    """Whether a fit from the ``checkpoint`` file continues the run of ``log_dir`` (lies in it);
    Lightning's ``last``/``hpc`` do not count (their file is found only once fit starts)."""
    if checkpoint in ("last", "hpc", "best", "registry") or checkpoint.startswith("registry:"):
        return False
    if get_protocol(checkpoint) != "file" or get_protocol(log_dir) != "file":
        return checkpoint.startswith(log_dir.rstrip("/") + "/")
    return Path(checkpoint).resolve().is_relative_to(Path(log_dir).resolve())


def run_folder_message(log_dir: str, held: list[str], no_logger: bool, fit: bool) -> str:
    """The refusal of a run whose ``log_dir`` holds another run's files ``held``."""
    elsewhere = ("set another --trainer.default_root_dir (with logger: false the config goes there)" if no_logger
                 else "log to another folder (another --trainer.logger.init_args.version or name; no version "
                      "numbers the runs)")
    resume = ", resume that run with --ckpt_path pointing to one of its checkpoints (it appends)" if fit else ""
    return (f"the run folder {log_dir} holds {' and '.join(held)} of another run, which this run would replace; "
            f"{elsewhere}{resume}, or pass --overwrite true (save_config_kwargs={{'overwrite': True}} in Python) "
            "to replace them")


def keep_metrics(logger: CSVLogger, checkpoint: str) -> None:
    """Let a fit resumed in its own folder append to the run's ``metrics.csv``: keep the rows
    logged before the checkpoint's step (CSVLogger deletes the file when it opens the folder; the
    rows after the checkpoint are logged again) and have the logger append to them."""
    path = os.path.join(logger.log_dir, METRICS)
    fs = get_filesystem(path)
    if not fs.isfile(path):
        return
    step = checkpoint_step(checkpoint)
    with fs.open(path, "r", newline="") as stream:
        reader = csv.DictReader(stream)
        header, rows = list(reader.fieldnames or []), [row for row in reader if int(row["step"]) < step]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")  # its "will be deleted" warning
        experiment = logger.experiment
    with fs.open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    experiment.metrics_keys = header


def checkpoint_step(checkpoint: str) -> int:
    """The ``global_step`` a Lightning checkpoint file was saved at (a local file is mapped, not read)."""
    if get_protocol(checkpoint) == "file":
        return torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    with get_filesystem(checkpoint).open(checkpoint, "rb") as stream:
        return torch.load(stream, map_location="cpu", weights_only=False)["global_step"]


REGISTERED_FIELDS = {"projector": "projectors", "rule": "update_rules", "inner": "inner_optimizers",
                     "schedule": "schedules", "method": "methods"}
"""``lowrank.<field>`` → the registry kind whose names it takes."""


def list_registered_names(parser: LightningArgumentParser) -> None:
    """Append the names registered now (built-ins and installed plugins) to the help of each
    ``lowrank`` field that takes one."""
    for action in parser._actions:
        field = action.dest.removeprefix("lowrank.")
        if action.dest.startswith("lowrank.") and field in REGISTERED_FIELDS:
            names = ", ".join(sorted(plugins.registered(REGISTERED_FIELDS[field])))
            action.help = f"{action.help or ''} Registered: {names}."


def run_cli(args: list[str]) -> None:
    """Run :class:`LowRankCLI` on ``args``; a config error ends in one ``error:`` line, exit code 2."""
    try:
        LowRankCLI(args=args)
    except (ConfigError, plugins.UnknownComponentError) as exc:  # a config error: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
