"""Preference data as batches: each item two rows of prompt + completion (a pair's chosen and
rejected; a KTO completion and its prompt with another record's completion, the rows KTO's KL
estimate reads), a batch of B items one batch of 2B right-padded rows, the B first rows then
the B second (TRL's layout, codelm.training.preference's), with each row's reference log-prob
once computed. ``PreferenceBatches`` orders and shares them as ``Batches`` does."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from codelm.data.preferences import Preference
from codelm.training.batches import Batches


class PreferenceRows(Dataset):
    """Encoded preferences as items of two rows each: a pair's (chosen, rejected), or, for
    labelled completions (``unpaired``), the completion and the KL row: its prompt with the
    completion of the record before it (TRL's KTO pairs each prompt with the previous
    completion), cut to ``block_size``. ``reference``: (n, 2) reference log-probs of the rows,
    once computed (``set_reference``)."""

    def __init__(self, preferences: Sequence[Preference], block_size: int, unpaired: bool):
        self.preferences = list(preferences)
        self.block_size = block_size
        self.unpaired = unpaired
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.preferences)

    def completions(self, i: int) -> tuple[list[int], list[int]]:
        """The two completions after item ``i``'s prompt."""
        preference = self.preferences[i]
        if not self.unpaired:
            return preference.completions
        room = self.block_size - len(preference.prompt)
        other = self.preferences[i - 1].completions[0][:room]
        return preference.completions[0], other

    def __getitem__(self, i: int) -> dict:
        preference = self.preferences[i]
        rows = [torch.tensor(preference.prompt + completion, dtype=torch.long)
                for completion in self.completions(i)]
        item = {"rows": rows, "prompt_tokens": len(preference.prompt)}
        if self.unpaired:
            item["desirable"] = bool(preference.label)
        if self.reference is not None:
            item["ref_logps"] = self.reference[i]
        return item

    def set_reference(self, reference: torch.Tensor) -> None:
        if reference.shape != (len(self), 2):
            raise ValueError(f"reference log-probs of shape {tuple(reference.shape)}, for "
                             f"{len(self)} items of two rows: computed for other data; remove "
                             "the run's reference file to compute them again")
        self.reference = reference


def collate_preferences(items: Sequence[dict], pad_id: int | None) -> dict[str, torch.Tensor]:
    """B items as one batch of 2B right-padded rows, the first rows then the second: ``ids``
    (pad_id, or 0, after each row), ``attention_mask`` (real tokens), ``completion_mask`` (the
    completions' tokens); ``desirable`` (B,) of labelled completions; ``ref_logps`` (2B,)
    where the items hold them."""
    rows = [item["rows"][k] for k in (0, 1) for item in items]
    prompts = [item["prompt_tokens"] for k in (0, 1) for item in items]
    ids = pad_sequence(rows, batch_first=True, padding_value=0 if pad_id is None else pad_id)
    lengths = torch.tensor([len(row) for row in rows])
    positions = torch.arange(ids.shape[1])[None]
    attention = positions < lengths[:, None]
    completion = attention & (positions >= torch.tensor(prompts)[:, None])
    batch = {"ids": ids, "attention_mask": attention.long(),
             "completion_mask": completion.long()}
    if "desirable" in items[0]:
        batch["desirable"] = torch.tensor([item["desirable"] for item in items])
    if "ref_logps" in items[0]:
        batch["ref_logps"] = torch.stack([item["ref_logps"] for item in items]).T.flatten()
    return batch


class PreferenceBatches(Batches):
    """``Batches`` of PreferenceRows: ``batch_size`` items (2 x batch_size rows) a
    micro-batch."""

    collate = staticmethod(collate_preferences)
