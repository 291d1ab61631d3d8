"""Preference data as batches: each item two rows of prompt + completion (a pair's chosen and
rejected; a KTO completion and its prompt with another record's completion, the rows KTO's KL
estimate reads), a batch of B items one batch of 2B right-padded rows, the B first rows then
the B second (TRL's layout, codelm.training.preference's), with each row's reference log-prob
once computed. With packing the same rows also go end to end into fewer rows (``PackedRows``:
the forward's layout, TRL's padding-free), and the loss reads the padded layout back from it.
``PreferenceBatches`` orders and shares them as ``Batches`` does."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from codelm.data.preferences import Preference
from codelm.kernels import IGNORE_INDEX
from codelm.training.batches import Batches, first_fit_rows
from codelm.training.preference import PACKED_KEYS, PackedRows


def pack_rows(rows: Sequence[torch.Tensor], width: int, pad_id: int) -> PackedRows:
    """``rows`` (each at most ``width`` tokens) packed first fit (batches.first_fit_rows, in an
    order seeded by 0: the same rows pack the same way), and the map from the padded layout's
    predictions to the packed ones."""
    bins = first_fit_rows([len(row) for row in rows], width, seed=0)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    document_ids = torch.full_like(ids, -1)
    longest = max(len(row) for row in rows)
    index = torch.zeros(len(rows), longest - 1, dtype=torch.long)
    for r, members in enumerate(bins):
        offset = 0
        for n in members:
            row = rows[n]
            end = offset + len(row)
            ids[r, offset:end] = row
            labels[r, offset:end - 1] = row[1:]
            document_ids[r, offset:end] = n
            index[n, : len(row) - 1] = r * (width - 1) + torch.arange(offset, end - 1)
            offset = end
    return PackedRows(ids, labels, document_ids, index)


class PreferenceRows(Dataset):
    """Encoded preferences as items of two rows each: a pair's (chosen, rejected), or, for
    labelled completions (``unpaired``), the completion and the KL row: its prompt with the
    completion of the nearest record before it (cyclically) whose prompt differs, cut to
    ``block_size``. TRL's KTO pairs each prompt with the previous completion of rows laid out
    chosen-block then rejected-block; here the two halves of a pair are neighbours, so the
    previous record alone would often be the same prompt's other completion. ``reference``: (n, 2) reference log-probs of the rows,
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
        other = self.preferences[self._kl_partner(i)].completions[0][:room]
        return preference.completions[0], other

    def _kl_partner(self, i: int) -> int:
        """The nearest record before item ``i`` (cyclically) with another prompt; the one before
        it where every record has ``i``'s prompt."""
        prompt = self.preferences[i].prompt
        for back in range(1, len(self.preferences)):
            j = (i - back) % len(self.preferences)
            if self.preferences[j].prompt != prompt:
                return j
        return (i - 1) % len(self.preferences)

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


def collate_preferences(items: Sequence[dict], pad_id: int | None, pack_into: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """B items as one batch of 2B right-padded rows, the first rows then the second: ``ids``
    (pad_id, or 0, after each row), ``attention_mask`` (real tokens), ``completion_mask`` (the
    completions' tokens); ``desirable`` (B,) of labelled completions; ``ref_logps`` (2B,)
    where the items hold them; with ``pack_into`` (tokens) the rows packed too, PackedRows'
    fields under PACKED_KEYS."""
    rows = [item["rows"][k] for k in (0, 1) for item in items]
    prompts = [item["prompt_tokens"] for k in (0, 1) for item in items]
    pad = 0 if pad_id is None else pad_id
    ids = pad_sequence(rows, batch_first=True, padding_value=pad)
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
    if pack_into is not None:
        batch.update(zip(PACKED_KEYS, pack_rows(rows, pack_into, pad)))
    return batch


class PreferenceBatches(Batches):
    """``Batches`` of PreferenceRows: ``batch_size`` items (2 x batch_size rows) a
    micro-batch; with ``pack_into`` (tokens) each batch's rows packed too (``PackedRows``)."""

    def __init__(self, *args, pack_into: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.collate = partial(collate_preferences, pack_into=pack_into)
