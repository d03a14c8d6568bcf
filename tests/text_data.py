"""A task dataset of random token sequences and its padding collator, for Trainer tests on tiny models."""

import torch


class RandomTexts(torch.utils.data.Dataset):
    """``n`` rows ``{"input_ids": [...]}`` of ids in [3, vocab), of lengths in [min_len, max_len)."""

    def __init__(self, n, vocab, *, seed=0, min_len=4, max_len=10):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(3, vocab, (int(torch.randint(min_len, max_len, (1,), generator=g)),),
                                   generator=g).tolist() for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate_padded(rows):
    """input_ids, attention_mask and labels (-100 on padding) of rows padded with id 0."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        attention[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}
