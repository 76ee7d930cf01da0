"""The majority-class plateau: the metric that shows it, the warning that names it, the label noise."""

import random
import warnings

import pytest
import torch
from helpers import trainer
from torch import nn

from lit_deltasam import DeltaSAMConfig
from lit_deltasam.data.datamodule import flip_labels
from lit_deltasam.data.tasks import MajorityShare, build_metrics
from lit_deltasam.models import TextClassifier

N, LENGTH, VOCAB = 32, 6, 50


class TokenEncoder(nn.Module):
    """Logits from the first token's embedding; ``constant`` makes them the bias alone (one class for everything)."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 2)
        self.head = nn.Linear(2, 2)
        self.constant = constant
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(VOCAB // 2, 1))
            self.head.weight.copy_(torch.eye(2) * (0.0 if constant else 10.0))
            self.head.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.head(self.embed(input_ids[:, 0]))


def loader():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N, LENGTH), generator=g)
    batches = []
    for i in range(0, N, 8):
        x = ids[i : i + 8]
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x[:, 0] % 2})
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fit(constant: bool, config: DeltaSAMConfig, steps: int = 4, warmup_ratio: float = 0.0):
    module = TextClassifier(TokenEncoder(constant), config, 2, build_metrics("mr"), lr=1e-6, warmup_ratio=warmup_ratio)
    run = trainer(max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, loader(), loader())
    stalls = [w for w in caught if "one class" in str(w.message)]
    return run, stalls


def test_one_class_for_everything_warns_once_naming_the_method_and_the_remedy():
    run, stalls = fit(True, DeltaSAMConfig(method="sam", rho=0.05, rho_schedule="warmup", rho_warmup=2))
    assert run.callback_metrics["val/majority_share"] == 1.0
    assert len(stalls) == 1
    message = str(stalls[0].message)
    assert "global_step=2 " in message  # the first validation past the two warm-up steps
    assert "method='sam', rho=0.05, rho_schedule='warmup'" in message
    assert "try a smaller rho (now 0.05), rho_schedule='follow_lr'" in message
    assert "majority" not in message  # the data may be balanced


def test_the_advice_never_names_the_schedule_already_in_use():
    _, stalls = fit(True, DeltaSAMConfig(method="sam", rho=0.05, rho_schedule="follow_lr"), steps=2)
    assert len(stalls) == 1
    assert "rho_schedule='warmup'" in str(stalls[0].message).split("try", 1)[1]


def test_a_model_that_separates_the_classes_does_not_warn():
    run, stalls = fit(False, DeltaSAMConfig(method="sam", rho=0.05))
    assert run.callback_metrics["val/acc"] == 1.0
    assert run.callback_metrics["val/majority_share"] < 0.75
    assert stalls == []


def test_the_warning_waits_for_the_learning_rate_warm_up():
    _, stalls = fit(True, DeltaSAMConfig(method="erm"), steps=4, warmup_ratio=0.75)
    assert len(stalls) == 1
    assert "global_step=3 (method='erm')" in str(stalls[0].message)
    assert "try more steps" in str(stalls[0].message)


def test_majority_share_counts_the_most_frequent_prediction():
    metric = MajorityShare(3)
    metric.update(torch.tensor([0, 2, 2, 2]), torch.zeros(4, dtype=torch.long))
    metric.update(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long))
    assert metric.compute().item() == pytest.approx(4 / 6)


def test_label_noise_flips_the_given_fraction_to_another_class():
    examples = [{"text": str(i), "label": i % 3} for i in range(100)]
    noisy = flip_labels(examples, 0.2, 3, random.Random(0))
    changed = [a for a, b in zip(examples, noisy) if a["label"] != b["label"]]
    assert len(changed) == 20
    assert [e["text"] for e in noisy] == [e["text"] for e in examples]
    assert noisy == flip_labels(examples, 0.2, 3, random.Random(0))
    assert [e["label"] for e in examples] == [i % 3 for i in range(100)]  # the input is not modified
