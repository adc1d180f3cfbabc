"""GLUEDataModule on files the test writes in the original GLUE TSV layouts (and on an in-memory
stand-in for the hub dataset): every task yields padded batches of the right shape whose
tokens decode to the right columns and whose labels are the hub's label ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from lit_lowrank.data import glue as glue_module
from lit_lowrank.data.glue import GLUE_SPECS, GLUEDataModule
from lit_lowrank.metrics.glue import GLUE_TASKS

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"]

# (sentence a, sentence b) pairs; one holds a bare double quote, which GLUE files never escape
PAIRS = [("the cat sat on the mat .", "a cat is sitting ."),
         ('he said " no " to the offer .', "the offer was refused ."),
         ("rain fell all day in the city", "it was sunny"),
         ("stocks rose sharply on monday", "markets gained ground at the start of the week"),
         ("she plays the violin", "she is a musician"),
         ("the bridge was closed for repairs last year after the flood damaged it badly", "traffic moved")]


def mnli_row(header: list[str], i: int, a: str, b: str, gold: str) -> list[str]:
    values = {"index": str(i), "promptID": str(100 + i), "pairID": f"{100 + i}e", "genre": "fiction",
              "sentence1": a, "sentence2": b, "gold_label": gold}
    return [values.get(col, "( parse )" if "parse" in col else gold) for col in header]


def task_rows(task: str, split_file: str) -> tuple[list[str] | None, list[list[str]], list]:
    """(header or None, rows, expected hub label ids) of one file."""
    n = len(PAIRS)
    if task == "cola":
        labels = [i % 2 for i in range(n)]
        return None, [["gj04", str(y), "" if y else "*", a] for (a, _), y in zip(PAIRS, labels)], labels
    if task == "sst2":
        labels = [(i + 1) % 2 for i in range(n)]
        return ["sentence", "label"], [[a, str(y)] for (a, _), y in zip(PAIRS, labels)], labels
    if task == "mrpc":
        labels = [i % 2 for i in range(n)]
        return (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                [[str(y), str(7000 + i), str(8000 + i), a, b] for i, ((a, b), y) in enumerate(zip(PAIRS, labels))],
                labels)
    if task == "qqp":
        labels = [(i // 2) % 2 for i in range(n)]
        return (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                [[str(i), str(2 * i), str(2 * i + 1), a, b, str(y)] for i, ((a, b), y) in enumerate(zip(PAIRS, labels))],
                labels)
    if task == "stsb":
        scores = [0.0, 1.25, 2.5, 3.8, 4.2, 5.0]
        return (STSB_HEADER, [[str(i), "main-news", "2012", "2012", str(i), "none", "none", a, b, f"{s:.3f}"]
                              for i, ((a, b), s) in enumerate(zip(PAIRS, scores))], scores)
    if task == "mnli":
        names = ["entailment", "neutral", "contradiction"]
        offset = 1 if split_file == "dev_mismatched.tsv" else 0  # the two dev sets differ
        gold = [names[(i + offset) % 3] for i in range(n)]
        header = MNLI_TRAIN_HEADER if split_file == "train.tsv" else MNLI_DEV_HEADER
        return header, [mnli_row(header, i, a, b, g) for i, ((a, b), g) in enumerate(zip(PAIRS, gold))], \
            [names.index(g) for g in gold]
    if task in ("qnli", "rte"):
        names = ["entailment", "not_entailment"]
        gold = [names[i % 2] for i in range(n)]
        header = ["index", "question", "sentence", "label"] if task == "qnli" else \
            ["index", "sentence1", "sentence2", "label"]
        return header, [[str(i), a, b, g] for i, ((a, b), g) in enumerate(zip(PAIRS, gold))], \
            [names.index(g) for g in gold]
    assert task == "wnli"
    labels = [(i + 1) % 2 for i in range(n)]
    return (["index", "sentence1", "sentence2", "label"],
            [[str(i), a, b, str(y)] for i, ((a, b), y) in enumerate(zip(PAIRS, labels))], labels)


def write_glue(root: Path, task: str) -> dict[str, list]:
    """Write ``task``'s train and dev files under ``root``; return the expected labels per file."""
    spec = GLUE_SPECS[task]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split_file in ["train.tsv"] + [tsv for _, tsv in spec.validation.values()]:
        header, rows, labels = task_rows(task, split_file)
        lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(r) for r in rows]
        text = "\n".join(lines) + "\n"
        if task == "mrpc":
            text = "\ufeff" + text  # the distributed MRPC files start with a byte-order mark
        (folder / split_file).write_text(text, encoding="utf-8")
        expected[split_file] = labels
    return expected


def batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(iter(loader))


def test_specs_cover_the_nine_tasks():
    assert set(GLUE_SPECS) == set(GLUE_TASKS)
    assert {t: s.num_labels for t, s in GLUE_SPECS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "stsb": 1, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_every_task_from_glue_tsv(tmp_path, task):
    expected = write_glue(tmp_path, task)
    max_len = 12
    dm = GLUEDataModule(task, data_dir=str(tmp_path), max_seq_length=max_len, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    spec = GLUE_SPECS[task]
    pair = spec.hub_columns[1] is not None
    tokenizer = dm.tokenizer

    train = batches(dm.train_dataloader())
    assert sum(b["labels"].shape[0] for b in train) == len(PAIRS)
    train_labels = sorted(torch.cat([b["labels"] for b in train]).tolist())
    assert train_labels == pytest.approx(sorted(expected["train.tsv"]))

    loaders = dm.val_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    assert len(loaders) == len(spec.validation) == len(dm.val_names)
    for loader, (_, tsv) in zip(loaders, spec.validation.values()):
        got = batches(loader)
        labels = torch.cat([b["labels"] for b in got])
        assert labels.dtype == (torch.float32 if task == "stsb" else torch.int64)
        assert labels.tolist() == pytest.approx(expected[tsv])  # validation keeps file order
        first = got[0]
        b, t = first["input_ids"].shape
        assert first["attention_mask"].shape == (b, t) and b == 4
        lengths = first["attention_mask"].sum(1)
        assert t == lengths.max() <= max_len  # padded to the longest in the batch, truncated
        # the decoded tokens are the file's text columns (uncased tokenizer)
        for row in range(b):
            a, b_text = PAIRS[row]
            ids = first["input_ids"][row, : lengths[row]]
            full = tokenizer(a, b_text if pair else None)["input_ids"]
            if len(full) <= max_len:
                assert ids.tolist() == full
            else:
                assert len(ids) == max_len
        if pair:  # the second segment is marked for BERT-style models
            assert first["token_type_ids"][0].max() == 1


def test_mnli_has_matched_and_mismatched(tmp_path):
    write_glue(tmp_path, "mnli")
    dm = GLUEDataModule("mnli", data_dir=str(tmp_path), max_seq_length=32, batch_size=8)
    dm.setup("fit")
    assert dm.val_names == ("matched", "mismatched")
    matched, mismatched = (torch.cat([b["labels"] for b in loader]) for loader in dm.val_dataloader())
    assert matched.tolist() == [0, 1, 2, 0, 1, 2]
    assert mismatched.tolist() == [1, 2, 0, 1, 2, 0]


def test_malformed_rows_are_skipped_with_a_warning(tmp_path):
    write_glue(tmp_path, "qqp")
    with (tmp_path / "QQP" / "train.tsv").open("a") as f:
        f.write("99\t1\t2\tonly one question\n")
    dm = GLUEDataModule("qqp", data_dir=str(tmp_path), max_seq_length=16)
    with pytest.warns(UserWarning, match="skipped 1 of 7 rows"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == len(PAIRS)


def test_max_train_examples(tmp_path):
    write_glue(tmp_path, "sst2")
    dm = GLUEDataModule("sst2", data_dir=str(tmp_path), max_train_examples=3)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["validation"]) == len(PAIRS)


def test_hub_columns_are_mapped(monkeypatch):
    """The hub path: MNLI's premise/hypothesis (and the extra idx column) become the pair."""
    def split(offset: int) -> Dataset:
        return Dataset.from_dict({"premise": [a for a, _ in PAIRS], "hypothesis": [b for _, b in PAIRS],
                                  "label": [(i + offset) % 3 for i in range(len(PAIRS))],
                                  "idx": list(range(len(PAIRS)))})

    fake = DatasetDict(train=split(0), validation_matched=split(1), validation_mismatched=split(2))
    calls = []
    monkeypatch.setattr(glue_module.GLUEDataModule, "_load_hub", lambda self: calls.append(self.task) or fake)
    dm = GLUEDataModule("mnli", max_seq_length=64, batch_size=6)
    dm.prepare_data()
    dm.setup("fit")
    assert calls and set(calls) == {"mnli"}
    matched, mismatched = dm.val_dataloader()
    batch = next(iter(matched))
    assert batch["labels"].tolist() == [(i + 1) % 3 for i in range(len(PAIRS))]
    assert batch["input_ids"][0, : batch["attention_mask"][0].sum()].tolist() == \
        dm.tokenizer(*PAIRS[0])["input_ids"]
    assert next(iter(mismatched))["labels"].tolist() == [(i + 2) % 3 for i in range(len(PAIRS))]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cola, sst2|'cola', 'sst2'"):
        GLUEDataModule("sst5")
    with pytest.raises(FileNotFoundError, match="SST-2"):
        GLUEDataModule("sst2", data_dir=str(tmp_path))
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="not one of"):
        GLUEDataModule("rte", data_dir=str(tmp_path)).setup("fit")
