"""Text encoders with a classification head: a pretrained HF model, or a small one trained from scratch.

Every encoder maps a tokenized batch (``input_ids``, ``attention_mask``, optional
``token_type_ids``) to logits ``[n, num_labels]``, and its last ``nn.Linear`` is the
classifier, which the ``head`` guardedness estimator reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification


def additive_mask(attention_mask: Tensor) -> Tensor:
    """``[n, L]`` 0/1 mask to the ``[n, 1, 1, L]`` additive mask attention layers take.

    HF builds this itself from the 2-D mask, but checks the mask's contents on the
    way (``mask.all()``), which ``torch.func.vmap`` cannot trace; passing the 4-D
    mask skips that check and keeps per-instance gradients available.
    """
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class HFClassifier(nn.Module):
    """A pretrained ``AutoModelForSequenceClassification``, by hub name or local path.

    Args:
        name_or_path: a hub id (``bert-base-uncased``) or a local folder in HF format.
        num_labels: classes; 1 for regression.
        attn_implementation: passed to ``from_pretrained`` (``sdpa`` or ``eager``).
    """

    def __init__(
        self,
        name_or_path: Union[str, Path],
        num_labels: int,
        attn_implementation: str = "sdpa",
        config: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path)
        if config is not None:
            # the architecture alone (a checkpoint's weights replace its random ones): nothing to fetch
            hf_config = AutoConfig.for_model(**config)
            hf_config._attn_implementation = attn_implementation
            self.model = AutoModelForSequenceClassification.from_config(hf_config)
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.name_or_path,
                num_labels=num_labels,
                attn_implementation=attn_implementation,
                problem_type="regression" if num_labels == 1 else "single_label_classification",
                ignore_mismatched_sizes=True,  # a fine-tuned base with another number of classes gets a new head
            )
        self.model.train()  # from_pretrained returns the model in eval mode, and Lightning keeps module modes

    def architecture(self) -> dict[str, Any]:
        """The model's HF config as a dict: with the checkpoint's weights, all a rebuild needs."""
        return self.model.config.to_dict()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=additive_mask(attention_mask), **kwargs).logits


class SmallEncoder(nn.Module):
    """A small Transformer encoder trained from scratch: fast runs and tests on CPU.

    Mean-pools the token states under the attention mask, then a dropout and the classifier.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 256,
        dropout: float = 0.1,
        max_length: int = 512,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_labels)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(dim))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        states = self.embed(input_ids) + self.position(positions)
        states = self.encoder(states, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (self.norm(states) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))
