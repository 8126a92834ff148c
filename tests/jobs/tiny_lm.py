"""The tiny language-model data the framework-callback tests train on (made here, nothing is
downloaded): ``n`` sequences of ``SEQ_LEN`` token ids, sequence ``i`` with ``real_tokens(i)``
tokens and padding after them, as a tokenizer's padded batch would be."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

SEQ_LEN = 8
VOCAB = 32
BATCH = 2
"""Sequences a micro-batch, on each device."""
ACCUMULATE = 2
"""Micro-batches an optimizer step (gradient accumulation)."""


def real_tokens(i: int) -> int:
    """The non-padding tokens of sequence ``i``: 2 to 8."""
    return 2 + i % (SEQ_LEN - 1)


class TinyLMData(Dataset[dict[str, torch.Tensor]]):
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) of ``n`` sequences."""

    def __init__(self, n: int = 16) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, VOCAB, (SEQ_LEN,), generator=torch.Generator().manual_seed(i))
        mask = (torch.arange(SEQ_LEN) < real_tokens(i)).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
