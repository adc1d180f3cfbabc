"""Tasks: losses against the models' own loss computations, metrics against plain formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy
from transformers import BertConfig, BertForSequenceClassification

from lit_lowrank.lightning import CausalLM, SequenceClassification


@pytest.fixture
def llama(small_llama):
    torch.manual_seed(0)
    return small_llama(97).eval()


def tiny_bert(num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def test_causal_lm_loss_matches_hf_shifted_labels(llama):
    tokens = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        ours = CausalLM().step(llama, tokens).loss
        # HF shifts the labels itself; with a causal model the logits of the full sequence's
        # first 11 positions are those of the 11-token input we feed.
        reference = llama(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(ours, reference)


def test_perplexity_is_exp_of_token_weighted_mean_loss(llama):
    task = CausalLM()
    batches = [torch.randint(0, 97, (b, 9)) for b in (1, 4)]  # different token counts
    losses, counts = [], []
    with torch.no_grad():
        for batch in batches:
            out = task.step(llama, batch)
            task.update(out)
            losses.append(out.loss.item())
            counts.append(batch[:, 1:].numel())
    (result,) = task.compute()
    mean = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    assert result["loss"].item() == pytest.approx(mean, rel=1e-6)
    assert result["ppl"].item() == pytest.approx(math.exp(mean), rel=1e-5)
    with torch.no_grad():
        task.update(task.step(llama, batches[1]))
    assert task.compute()[0]["loss"].item() == pytest.approx(losses[1], rel=1e-6)  # reset in between


def test_classification_loss_is_hf_loss_and_metrics_per_loader():
    model = tiny_bert(3)
    task = SequenceClassification(3, metrics=MulticlassAccuracy(3, average="micro"))
    batch = {"input_ids": torch.randint(0, 50, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    with torch.no_grad():
        out = task.step(model, batch)
        torch.testing.assert_close(out.loss, model(**batch).loss)
        task.update(out, dataloader_idx=0)
        other = dict(batch, labels=out.preds.clone())  # all predictions correct on loader 1
        task.update(task.step(model, other), dataloader_idx=1)
    first, second = task.compute()
    expected = (out.preds == batch["labels"]).float().mean()
    torch.testing.assert_close(first["MulticlassAccuracy"], expected)
    assert second["MulticlassAccuracy"].item() == 1.0


def test_regression_uses_mse_on_the_single_logit():
    model = tiny_bert(1)
    batch = {"input_ids": torch.randint(0, 50, (4, 5)), "labels": torch.tensor([0.5, 1.0, 4.2, 3.3])}
    with torch.no_grad():
        out = SequenceClassification(1).step(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits.squeeze(-1)
    torch.testing.assert_close(out.loss, ((logits - batch["labels"]) ** 2).mean())
    torch.testing.assert_close(out.preds, logits)


def test_num_labels_must_be_positive():
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassification(0)


def test_metrics_reset_under_inference_mode_update_again_under_no_grad():
    """Trainer.validate (inference mode) then fit's validation (no_grad): the states reset at
    epoch end must be ordinary tensors, else the next in-place update fails."""
    model = tiny_bert(3)
    task = SequenceClassification(3, metrics=MulticlassAccuracy(3, average="micro"))
    batch = {"input_ids": torch.randint(0, 50, (6, 5)), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    with torch.inference_mode():
        task.update(task.step(model, batch))
        first = task.compute()[0]
    with torch.no_grad():
        out = task.step(model, batch)
        task.update(out)
        second = task.compute()[0]
    torch.testing.assert_close(second["MulticlassAccuracy"], (out.preds == batch["labels"]).float().mean())
    torch.testing.assert_close(second["loss"], first["loss"])
