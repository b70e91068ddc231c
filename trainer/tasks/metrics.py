"""Evaluation metrics as sums that add up across processes.

Each accumulator keeps only counts (loss sums, a confusion matrix, entity matches), never
the logits, so memory stays flat with the evaluation set size, and one all-reduce of the
counts gives exactly the metric over the whole set, whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trainer.data.encode import IGNORE_INDEX
from trainer.tasks.tag_schemes import decode, entity_type

SumAcrossProcesses = Callable[[torch.Tensor], torch.Tensor]


class LossMetrics:
    """Token-weighted loss and its perplexity (what MLM and CLM report)."""

    def __init__(self) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64)  # loss sum, target count

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum, count) -> None:
        """Add one batch; the loss sum and target count come from the task's loss."""
        self.totals += torch.stack([loss_sum.detach().double().cpu(), count.double().cpu()])

    def compute(self, sum_across: SumAcrossProcesses) -> dict:
        """Reduce over processes and report the token-weighted loss and perplexity."""
        loss_sum, count = sum_across(self.totals).tolist()
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class PretrainingMetrics(LossMetrics):
    """The MLM loss and perplexity plus, per sequence head (NSP), its loss and accuracy;
    `loss` is their sum, the objective the pretraining step minimises."""

    def __init__(self, own_name: str, head_names: list[str]) -> None:
        super().__init__()
        self.own_name = own_name
        self.head_names = head_names
        self.heads = torch.zeros(len(head_names), 3, dtype=torch.float64)  # loss, count, correct

    def update_head(self, index: int, loss_sum, count, correct) -> None:
        """Add one batch of the head at `index` (of `head_names`)."""
        self.heads[index] += torch.stack([loss_sum.detach(), count, correct]).double().cpu()

    def compute(self, sum_across: SumAcrossProcesses) -> dict:
        """Reduce over processes; perplexity comes from the MLM part alone."""
        own = super().compute(sum_across)
        results = {f"{self.own_name}_loss": own["loss"], "perplexity": own["perplexity"]}
        heads = sum_across(self.heads)
        for name, (loss_sum, count, correct) in zip(self.head_names, heads.tolist(), strict=True):
            results[f"{name}_loss"] = loss_sum / max(count, 1.0)
            results[f"{name}_accuracy"] = correct / max(count, 1.0)
        head_losses = sum(results[f"{name}_loss"] for name in self.head_names)
        return {"loss": own["loss"] + head_losses, **results}


def _precision_recall_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor):
    precision = tp / (tp + fp).clamp(min=1)
    recall = tp / (tp + fn).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return precision, recall, f1


class ClassificationMetrics(LossMetrics):
    """Accuracy, precision, recall and F1 from a confusion matrix (rows: true labels).
    Two classes: binary scores for class 1; more: the macro average over classes."""

    def __init__(self, label_names: list[str]) -> None:
        super().__init__()
        self.label_names = label_names
        self.confusion = torch.zeros(len(label_names), len(label_names), dtype=torch.float64)

    def update(self, logits, labels, loss_sum, count) -> None:
        """Add one batch's predictions to the confusion matrix."""
        super().update(logits, labels, loss_sum, count)
        predictions = logits.argmax(dim=-1).cpu()
        size = len(self.label_names)
        flat = labels.cpu() * size + predictions
        self.confusion += torch.bincount(flat, minlength=size * size).reshape(size, size)

    def compute(self, sum_across: SumAcrossProcesses) -> dict:
        """Reduce the matrix over processes and derive the scores from it."""
        results = {"loss": super().compute(sum_across)["loss"]}
        confusion = sum_across(self.confusion)
        tp = confusion.diag()
        precision, recall, f1 = _precision_recall_f1(
            tp, confusion.sum(0) - tp, confusion.sum(1) - tp
        )
        pick = (lambda v: v[1]) if len(self.label_names) == 2 else (lambda v: v.mean())
        results |= {
            "accuracy": (tp.sum() / confusion.sum().clamp(min=1)).item(),
            "precision": pick(precision).item(),
            "recall": pick(recall).item(),
            "f1": pick(f1).item(),
            "f1_per_class": dict(zip(self.label_names, f1.tolist(), strict=True)),
            "confusion_matrix": confusion.long().tolist(),
            "labels": self.label_names,
        }
        return results


class EntityMetrics(LossMetrics):
    """Entity-level precision, recall and F1 (an entity counts only when its type and exact
    span match, each sequence read strictly in its tag scheme as seqeval's strict mode
    reads it), plus token accuracy on first sub-tokens. Entities come from the decoder
    `trainer predict` uses (tasks/tag_schemes.py), so what it shows is what is counted."""

    def __init__(self, label_names: list[str], scheme: str = "iob2") -> None:
        super().__init__()
        self.label_names = label_names
        self.scheme = scheme
        self.types = sorted({entity_type(name) for name in label_names if name != "O"})
        self.counts = torch.zeros(len(self.types), 3, dtype=torch.float64)  # tp, fp, fn
        self.tokens = torch.zeros(2, dtype=torch.float64)  # correct, total

    def update(self, logits, labels, loss_sum, count) -> None:
        """Decode the batch into tag sequences and count entity matches per type."""
        super().update(logits, labels, loss_sum, count)
        predictions, labels = logits.argmax(dim=-1).cpu(), labels.cpu()
        for predicted_row, label_row in zip(predictions, labels, strict=True):
            keep = label_row != IGNORE_INDEX
            gold = [self.label_names[i] for i in label_row[keep].tolist()]
            guess = [self.label_names[i] for i in predicted_row[keep].tolist()]
            correct = sum(g == p for g, p in zip(gold, guess, strict=True))
            self.tokens += torch.tensor([correct, len(gold)])
            true_set = set(decode(gold, self.scheme))
            pred_set = set(decode(guess, self.scheme))
            for kind in {entity[0] for entity in true_set | pred_set}:
                if kind not in self.types:
                    continue
                row = self.types.index(kind)
                gold_k = {e for e in true_set if e[0] == kind}
                pred_k = {e for e in pred_set if e[0] == kind}
                self.counts[row] += torch.tensor(
                    [len(gold_k & pred_k), len(pred_k - gold_k), len(gold_k - pred_k)]
                )

    def compute(self, sum_across: SumAcrossProcesses) -> dict:
        """Micro-averaged entity scores over all types, with F1 per type."""
        results = {"loss": super().compute(sum_across)["loss"]}
        counts, tokens = sum_across(self.counts), sum_across(self.tokens)
        tp, fp, fn = counts.sum(0)
        precision, recall, f1 = _precision_recall_f1(tp, fp, fn)
        per_type = _precision_recall_f1(counts[:, 0], counts[:, 1], counts[:, 2])[2]
        results |= {
            "precision": precision.item(),
            "recall": recall.item(),
            "f1": f1.item(),
            "accuracy": (tokens[0] / tokens[1].clamp(min=1)).item(),
            "f1_per_type": dict(zip(self.types, per_type.tolist(), strict=True)),
        }
        return results


class PairMetrics(LossMetrics):
    """Preference pairs: the objective's loss per pair and the means per pair of what it
    logs (rewards, reward accuracy and margin, answer log-probabilities)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.logged = torch.zeros(len(names), dtype=torch.float64)

    def update_objective(self, loss_sum, count, logged) -> None:
        """Add one batch as the objective scored it."""
        self.totals += torch.stack([loss_sum.detach().double().cpu(), count.double().cpu()])
        self.logged += logged.detach().double().cpu()

    def compute(self, sum_across: SumAcrossProcesses) -> dict:
        """Reduce over processes; every value is a mean over all pairs."""
        loss_sum, count = sum_across(self.totals).tolist()
        logged = (sum_across(self.logged) / max(count, 1.0)).tolist()
        return {"loss": loss_sum / max(count, 1.0), **dict(zip(self.names, logged, strict=True))}
