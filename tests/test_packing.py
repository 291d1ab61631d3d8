"""Packed rows: several examples in one row, each a document of its own (positions from 0,
attention within it), give every example the logits, loss and gradients it has alone, for
every family codelm loads, sliding windows and learned positions included."""

import types

import pytest
import torch
from tiny_hf import FAMILIES, MODERN, WINDOW, tiny_checkpoints

from architecture import IGNORE_INDEX, document_positions
from codelm.data import encoding
from codelm.data.datasets import LMWindows, SupervisedExamples, collate

NAMES = FAMILIES + MODERN
LENGTHS = [9, WINDOW + 12, 5, 23]  # one example longer than the sliding window
ROW = 104  # the examples and a tail of padding, itself a document


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(NAMES, tmp_path_factory)


def _examples(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator) for n in LENGTHS]


def _packed(examples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of the examples one after another, padded to ROW; and its document ids."""
    ids = torch.cat(examples)
    docs = torch.cat([torch.full((len(e),), i) for i, e in enumerate(examples)])
    tail = ROW - len(ids)
    ids = torch.cat([ids, torch.zeros(tail, dtype=ids.dtype)])
    docs = torch.cat([docs, torch.full((tail,), len(examples))])
    return ids[None], docs[None]


def _next_tokens(example: torch.Tensor) -> torch.Tensor:
    """An example's labels: each token's next, nothing after its last."""
    labels = example.roll(-1)
    labels[-1] = IGNORE_INDEX
    return labels


def test_positions_restart_at_each_document():
    """document_positions counts from 0 again at each new document id of a row, and a row of one
    document counts to its end: each packed example gets the positions it has alone."""
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


@pytest.mark.parametrize("name", NAMES)
def test_a_packed_rows_logits_are_each_examples_own(checkpoints, name):
    """For every family, a row packing four examples (one longer than the sliding window) gives
    each the logits it has run alone, within 1e-5: packed examples do not see each other."""
    _, _, model = checkpoints[name]
    examples = _examples(0)
    idx, docs = _packed(examples)
    with torch.no_grad():
        packed = model(idx, document_ids=docs)[0]
        start = 0
        for example in examples:
            alone = model(example[None])[0]
            assert (packed[start : start + len(example)] - alone).abs().max().item() <= 1e-5
            start += len(example)


@pytest.mark.parametrize("name", ["gpt_bigcode", "llama", "mistral", "gemma2"])
def test_a_packed_batchs_loss_and_gradients_are_the_unpacked_batchs(checkpoints, name):
    """Summed over counted tokens (training's token-weighted loss), a packed row and the same
    examples run one by one give the same loss and the same gradient of every weight."""
    _, _, model = checkpoints[name]
    examples = _examples(1)
    idx, docs = _packed(examples)
    labels = torch.cat([_next_tokens(e) for e in examples])
    labels = torch.cat([labels, torch.full((ROW - len(labels),), IGNORE_INDEX)])[None]

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    packed = model(idx, labels, reduction="sum", document_ids=docs)
    one_by_one = sum(model(e[None], _next_tokens(e)[None], reduction="sum") for e in examples)
    assert packed.item() == pytest.approx(one_by_one.item(), rel=1e-6)
    for got, want in zip(gradients(packed), gradients(one_by_one)):
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_first_fit_rows_hold_every_example_once_within_the_row():
    """The packer places each example once, in the first open row with room for it (over a
    seeded shuffle; only the OPEN_ROWS latest rows are open), never past the row's capacity;
    the same seed gives the same rows."""
    from codelm.training.batches import OPEN_ROWS, first_fit_rows

    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 64, (500,), generator=generator).tolist()
    rows = first_fit_rows(lengths, 64, seed=7)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == first_fit_rows(lengths, 64, seed=7) != first_fit_rows(lengths, 64, seed=8)
    assert len(rows) < 0.7 * 500  # ~32 tokens an example: about two a row
    order = torch.randperm(500, generator=torch.Generator().manual_seed(7)).tolist()
    row_of = {i: r for r, row in enumerate(rows) for i in row}
    used = [0] * len(rows)  # each row's tokens, replaying the order
    created = 0
    for i in order:  # no open row before the one it went to had room for it
        first_open = max(0, created - OPEN_ROWS)
        assert all(64 - used[r] < lengths[i] for r in range(first_open, row_of[i]))
        assert row_of[i] >= first_open  # a closed row takes nothing more
        created = max(created, row_of[i] + 1)
        used[row_of[i]] += lengths[i]


def test_a_packed_row_is_its_examples_one_after_another():
    """A PackedExamples row is its examples' inputs and labels one after another,
    document ids numbering them, and collate pads a shorter row's document ids with
    -1: padding is part of no example."""
    import numpy as np

    from codelm.training.batches import PackedExamples

    seqs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    examples = SupervisedExamples.__new__(SupervisedExamples)  # three examples, in memory
    examples.ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    examples.offsets = np.cumsum([0] + [len(s) for s in seqs])
    examples.prompt_lens = np.array([2, 1, 3])
    packed = PackedExamples(examples, capacity=16, seed=0)
    assert len(packed) == 1
    row = packed[0]
    parts = [examples[i] for i in packed.rows[0]]
    assert torch.equal(row["input_ids"], torch.cat([p["input_ids"] for p in parts]))
    assert torch.equal(row["labels"], torch.cat([p["labels"] for p in parts]))
    assert row["document_ids"].tolist() == [k for k, p in enumerate(parts)
                                            for _ in p["input_ids"]]
    short = {key: value[:4] for key, value in row.items()}
    batch = collate([row, short], pad_id=0)
    assert batch["document_ids"][1, 4:].eq(-1).all()


def test_rows_count_input_tokens_and_fill_to_exactly_their_capacity():
    """An example of n + 1 stored tokens is n input tokens (its labels the same n shifted), so
    SupervisedExamples.lengths reads n off the offsets, and examples whose inputs sum to the
    capacity share one row."""
    import numpy as np

    from codelm.training.batches import PackedExamples

    seqs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    examples = SupervisedExamples.__new__(SupervisedExamples)  # three examples, in memory
    examples.ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    examples.offsets = np.cumsum([0] + [len(s) for s in seqs])
    examples.prompt_lens = np.array([2, 1, 3])
    assert examples.lengths.tolist() == [len(examples[i]["input_ids"]) for i in range(3)]
    assert examples.lengths.tolist() == [3, 2, 4]
    packed = PackedExamples(examples, capacity=9, seed=0)
    assert len(packed) == 1
    assert len(packed[0]["input_ids"]) == 9


def test_lm_windows_keep_each_file_to_itself(checkpoints, tmp_path):
    """DocumentWindows: a document starts at every EOS, so a file ends by predicting its EOS
    and its successor's first token is predicted from that EOS alone, and the model gives a
    file's tokens the logits they have after an EOS alone: what generation feeds an lm run's
    model (its prompts start after an EOS)."""
    import numpy as np

    from codelm.training.batches import DocumentWindows

    eos = 2
    tokens = np.array([7, 8, 9, eos, 10, 11, 12, 13, eos, 14, 15, 16], dtype=np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    windows = DocumentWindows(LMWindows(path, "uint16", len(tokens), 10, 10), eos)
    item = windows[0]
    assert item["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert item["labels"].tolist() == [8, 9, eos, 10, 11, 12, 13, eos, 14, 15]
    tok = types.SimpleNamespace(eos_id=eos, template_prefix=[])
    assert encoding.prompt_prefix(tok, "lm") == [eos]  # as an lm run's prompt starts
    _, _, model = checkpoints["llama"]
    with torch.no_grad():
        packed = model(item["input_ids"][None], document_ids=item["document_ids"][None])[0]
        alone = model(torch.tensor([[eos, 10, 11, 12, 13]]))[0]
    assert (packed[3:8] - alone).abs().max().item() <= 1e-5


def test_packing_is_on_by_default_where_a_row_holds_two_examples_or_more():
    """Left unset, packing is on where examples average at most half the block (two fit a row) and
    off where they are longer; set, it is as given."""
    import numpy as np

    from codelm.training import build

    def examples(lengths: list[int]) -> SupervisedExamples:
        made = SupervisedExamples.__new__(SupervisedExamples)
        made.offsets = np.cumsum([0] + [n + 1 for n in lengths])
        made.prompt_lens = np.ones(len(lengths), dtype=np.int64)
        return made

    short, long = examples([100, 200, 150]), examples([400, 500, 300])
    assert build.packing_pays(None, short, 512) and not build.packing_pays(None, long, 512)
    assert build.packing_pays(True, long, 512) and not build.packing_pays(False, short, 512)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("name", ["gpt_bigcode", "codegen", "llama", "qwen3", "gemma2", "mistral"])
def test_flex_attentions_block_mask_gives_the_boolean_masks_logits(checkpoints, name,
                                                                   monkeypatch):
    """The GPU path of packed rows (FlexAttention over kernels.document_mask's block mask, run
    on CPU here in eager mode, forward only) gives the boolean mask's logits; a soft cap
    (gemma2) or a window shorter than the row (mistral) keeps the boolean mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from codelm import kernels

    _, _, model = checkpoints[name]
    idx, docs = _packed(_examples(2))
    calls = []

    def eager_flex(*args, **kwargs):
        calls.append(kwargs["block_mask"])
        return flex_attention(*args, **kwargs)

    with torch.no_grad():
        boolean = model(idx, document_ids=docs)
        monkeypatch.setattr(kernels, "_flex_device", lambda device: True)
        monkeypatch.setattr(kernels, "_flex_attention", lambda: eager_flex)
        flex = model(idx, document_ids=docs)
    assert (flex - boolean).abs().max().item() <= 1e-5
    assert len(calls) == (0 if name in ("gemma2", "mistral") else model.cfg.n_layer)
