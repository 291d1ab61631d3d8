"""GGUF export: llama.cpp's own reader (the gguf package) finds each family's hyperparameters
and tokenizer (byte-level BPE, or SentencePiece-style with byte tokens and scores in merge order)
under llama.cpp's keys, its tensors hold the model's weights in llama.cpp's layouts (q/k rows
interleaved where its rotation pairs neighbours), and bad input is one line; llama.cpp itself
(llama-cpp-python, built from the registry: slow) reads the same token ids, continues greedily
as codelm does, and picks codelm's top-1 token on most positions from f16 and q8_0 files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny_hf import save_tiny_hf, train_family_tokenizer, train_hf_tokenizer
from tokenizers import Tokenizer

from architecture import PRESETS, Transformer
from codelm import loading, trainconfig
from codelm.data.sources import stdlib_files
from codelm.gguf import __main__ as export_gguf
from codelm.gguf import writer as gguf_writer
from codelm.models import families, pretrained
from codelm.training import plan
from tokenizer import CodeTokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")

class Case(NamedTuple):
    family: str
    style: str  # the tokenizer's, as tiny_hf trains it
    arch: str  # llama.cpp's architecture
    pre: str  # llama.cpp's pre-tokenizer (tokenizer.ggml.pre)


BYTE_LEVEL = {
    "llama": Case("llama", "llama3", "llama", "llama-bpe"),
    "qwen2": Case("qwen2", "qwen2", "qwen2", "qwen2"),
    "qwen3": Case("qwen3", "qwen2", "qwen3", "qwen2"),
    "starcoder2": Case("starcoder2", "starcoder", "starcoder2", "starcoder"),
    "gpt_bigcode": Case("gpt_bigcode", "starcoder", "starcoder", "starcoder"),
    "phi": Case("phi", "gpt2", "phi2", "gpt-2"),
    "phi3": Case("phi3", "gpt2", "phi3", "gpt-2"),
    "stablelm": Case("stablelm", "gpt2", "stablelm", "gpt-2"),
    "stablelm-parallel": Case("stablelm-parallel", "gpt2", "stablelm", "gpt-2"),
}
# SentencePiece-style BPE with byte fallback: Mistral's and Llama-2's (Prepend and Replace to
# U+2581), Gemma's and CodeGemma's (Replace alone), Phi-3-mini's in its Metaspace form.
SENTENCEPIECE = {
    "mistral": Case("mistral", "spm", "llama", "default"),
    "gemma": Case("gemma", "gemma", "gemma", "default"),
    "gemma2": Case("gemma2", "gemma", "gemma2", "default"),
    "phi3-spm": Case("phi3", "metaspace", "phi3", "default"),
}
CASES = {**BYTE_LEVEL, **SENTENCEPIECE}


def _texts() -> list[str]:
    return [p.read_text("utf-8", "replace") for p in stdlib_files()[::40]]


def make_checkpoint(case: Case, path: Path, texts: list[str],
                    trained: dict[str, Path] | None = None) -> Path:
    """A tiny random checkpoint of ``case``'s family with a trained tokenizer of its kind;
    ``trained``: style -> a tokenizer.json of that style already trained on ``texts``, which is
    copied (the families of one style share one tokenizer), filled with the one trained here."""
    path.mkdir(parents=True)
    trained = {} if trained is None else trained
    if case.style in trained:
        shutil.copyfile(trained[case.style], path / "tokenizer.json")
    else:
        byte_level = case.style in ("llama3", "starcoder", "gpt2")
        train = train_hf_tokenizer if byte_level else train_family_tokenizer
        train(case.style, texts, path / "tokenizer.json")
        trained[case.style] = path / "tokenizer.json"
    hf_tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = load_tokenizer(path / "tokenizer.json")
    overrides = {"starcoder2": {"sliding_window": None}, "phi3": {"sliding_window": None},
                 # llama.cpp's Gemma 2 below 27B scales queries by 1/sqrt(head_dim)
                 "gemma2": {"query_pre_attn_scalar": 32}}.get(case.family, {})
    save_tiny_hf(case.family, path, vocab_size=hf_tok.get_vocab_size(), bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id, **overrides)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    texts = _texts()
    root = tmp_path_factory.mktemp("gguf")
    trained = {}  # one tokenizer per style: families sharing a style share its training
    return {name: make_checkpoint(case, root / name, texts, trained)
            for name, case in CASES.items()}


def _field(reader, key: str):
    field = reader.fields[key]
    value = field.contents()
    return value


def _export(checkpoint: Path, tmp_path: Path, outtype: str = "f32") -> Path:
    return export_gguf.export(str(checkpoint), tmp_path / "model.gguf", outtype)


@pytest.mark.parametrize("name", list(CASES))
def test_the_reader_finds_each_familys_hyperparameters_and_tokenizer(name, checkpoints, tmp_path):
    """Read back by llama.cpp's own reader, each family's file holds its architecture, context,
    widths, head counts, rope base, norm epsilon and soft-capping under llama.cpp's keys, and its
    vocabulary, eos and FIM ids: what llama.cpp builds the model and its tokenizer from."""
    arch = CASES[name].arch
    model = pretrained.load(checkpoints[name])
    cfg = model.cfg
    reader = gguf.GGUFReader(_export(checkpoints[name], tmp_path))
    assert _field(reader, "general.architecture") == arch
    # llama.cpp's gemma2 slides as codelm does; its llama (Mistral's) attends to all positions
    context = cfg.block_size if arch == "gemma2" else min(cfg.block_size,
                                                           cfg.sliding_window or cfg.block_size)
    expected = {
        f"{arch}.context_length": context, f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.block_count": cfg.n_layer, f"{arch}.feed_forward_length": cfg.mlp_hidden,
        f"{arch}.attention.head_count": cfg.n_head,
        f"{arch}.attention.head_count_kv": cfg.n_kv_head,
    }
    if cfg.positions == "rope":
        expected[f"{arch}.rope.dimension_count"] = cfg.rotary_dim
        assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    if arch == "stablelm":  # llama.cpp takes the parallel form where no ffn_norm is written
        expected[f"{arch}.use_parallel_residual"] = cfg.parallel_residual
    if arch == "gemma2":
        expected[f"{arch}.attention.sliding_window"] = cfg.sliding_window
        pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
        assert pattern == [True, False, True]  # as transformers' Gemma2: even layers slide
    if cfg.attn_softcap is not None:
        assert _field(reader, f"{arch}.attn_logit_softcapping") == pytest.approx(cfg.attn_softcap)
    eps = f"{arch}.attention.layer_norm{'_rms' if cfg.norm == 'rmsnorm' else ''}_epsilon"
    assert _field(reader, eps) == pytest.approx(cfg.norm_eps)
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "tokenizer.ggml.model") == ("gpt2" if name in BYTE_LEVEL else "llama")
    assert _field(reader, "tokenizer.ggml.pre") == CASES[name].pre
    tok = load_tokenizer(checkpoints[name])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in json.loads(
        (checkpoints[name] / "tokenizer.json").read_text())["model"]["vocab"].items())
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    # the start token HF's tokenizer opens a text with is the one llama.cpp adds, and no other
    opened = Tokenizer.from_file(str(checkpoints[name] / "tokenizer.json")).encode("x")
    start = []  # the special tokens its post-processor puts before the text
    for token, special in zip(opened.ids, opened.special_tokens_mask):
        if not special:
            break
        start.append(token)
    assert _field(reader, "tokenizer.ggml.add_bos_token") == bool(start)
    if start:
        assert _field(reader, "tokenizer.ggml.bos_token_id") == start[-1]
    if name == "phi3":  # llama.cpp looks up Phi-3's </s> in a model named so
        assert "phi3" not in _field(reader, "general.name")
    if tok.fim_prefix_id is not None:
        assert _field(reader, "tokenizer.ggml.fim_pre_token_id") == tok.fim_prefix_id
        assert _field(reader, "tokenizer.ggml.fim_mid_token_id") == tok.fim_middle_id


@pytest.mark.parametrize("name", list(SENTENCEPIECE))
def test_a_sentencepiece_vocabulary_has_byte_tokens_scores_in_merge_order_and_its_prefix(
        name, checkpoints, tmp_path):
    """Against HF tokenizers: each id's token, <0xNN> as byte tokens, <unk> and the specials
    typed so, scores falling along the merges (llama.cpp's SPM merges the best-scoring pair
    first), the ▁ before a text exactly where HF puts one, BOS first."""
    hf = Tokenizer.from_file(str(checkpoints[name] / "tokenizer.json"))
    reader = gguf.GGUFReader(_export(checkpoints[name], tmp_path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    kinds = gguf.TokenType
    for i in range(hf.get_vocab_size()):
        token = hf.id_to_token(i)
        assert tokens[i] == token
        want = (kinds.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else kinds.UNKNOWN
                if token == "<unk>" else kinds.CONTROL if token in ("<s>", "</s>")
                else kinds.NORMAL)
        assert types[i] == want, (i, token)
    assert sum(t == kinds.BYTE for t in types) == 256
    spec = json.loads((checkpoints[name] / "tokenizer.json").read_text())
    made = list(dict.fromkeys("".join(m.split(" ") if isinstance(m, str) else m)
                              for m in spec["model"]["merges"]))
    made_scores = [scores[hf.token_to_id(t)] for t in made]
    assert all(a > b for a, b in zip(made_scores, made_scores[1:]))
    unmade = set(range(hf.get_vocab_size())) - {hf.token_to_id(t) for t in made}
    assert max(scores[i] for i in unmade) < made_scores[-1]
    prefixed = hf.encode("x", add_special_tokens=False).tokens[0].startswith("\u2581")
    assert _field(reader, "tokenizer.ggml.add_space_prefix") == prefixed
    assert _field(reader, "tokenizer.ggml.bos_token_id") == hf.token_to_id("<s>")
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == hf.token_to_id("<unk>")
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True


def _spm_pieces(text: str, vocab: dict[str, int], scores: list[float]) -> list[str]:
    """llama.cpp's SPM merging: the adjacent pair whose joined text is the best-scoring token
    merges first (the leftmost of equals), until no pair joins into a token."""
    pieces = list(text)
    while True:
        best = None
        for i in range(len(pieces) - 1):
            joined = pieces[i] + pieces[i + 1]
            if joined not in vocab:
                continue
            if best is None or scores[vocab[joined]] > scores[vocab[pieces[best] + pieces[best + 1]]]:
                best = i
        if best is None:
            return pieces
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]


def test_a_token_two_merges_make_scores_as_its_first_merge_so_llama_cpp_merges_as_hf():
    """xyz is made by merge 1 (x + yz) and again by merge 4 (xy + z): its score is merge 1's,
    so llama.cpp's best-score-first merging splits xyzw as HF's BPE does (xyz + w), where a
    score by merge 4 would let yz + w (merge 2) win first."""
    from tokenizers import models

    merges = [("y", "z"), ("x", "yz"), ("yz", "w"), ("x", "y"), ("xy", "z")]
    vocab = {t: i for i, t in enumerate(["x", "y", "z", "w", "yz", "xyz", "yzw", "xy"])}
    spec = {"model": {"vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
    scores = gguf_writer._merge_scores(spec, len(vocab))
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    for text in ("xyzw", "xyz", "yzw", "xyw"):
        assert _spm_pieces(text, vocab, scores) == hf.encode(text).tokens, text


def test_a_user_defined_tokens_text_is_what_hf_decodes_it_to(checkpoints, tmp_path):
    """llama.cpp prints a user-defined token's text as it is: Gemma's added runs of \u2581 (not
    special) are written as the spaces HF decodes them to, user-defined, while a control token
    keeps its text."""
    from tokenizers import AddedToken

    changed = tmp_path / "changed"
    shutil.copytree(checkpoints["gemma"], changed)
    hf = Tokenizer.from_file(str(changed / "tokenizer.json"))
    hf.add_tokens([AddedToken("\u2581\u2581", normalized=False)])  # in the vocabulary already
    hf.save(str(changed / "tokenizer.json"))
    (tmp_path / "out").mkdir()
    reader = gguf.GGUFReader(_export(changed, tmp_path / "out"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    run = hf.token_to_id("\u2581\u2581")
    assert tokens[run] == hf.decode([run]) == "  "
    assert types[run] == gguf.TokenType.USER_DEFINED
    eos = hf.token_to_id("</s>")
    assert (tokens[eos], types[eos]) == ("</s>", gguf.TokenType.CONTROL)


def test_an_added_token_that_looks_special_is_a_control_token():
    """llama.cpp's converter writes an added token that is not marked special but looks it
    (its does_token_look_special: <|...|>, DeepSeek's <\uff5c...\uff5c>, <pad>, <unusedN>) as a
    control token, its text unchanged; a plain added word stays user-defined."""
    from codelm.gguf.writer import _token_table

    looking = ["<|fim_pad|>", "<pad>", "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<unused7>"]
    words = ["a", "b", *looking, "plain\u2581word"]
    spec = {"model": {"vocab": {"a": 0, "b": 1}},
            "added_tokens": [{"content": text, "special": False} for text in words[2:]]}
    tok = types.SimpleNamespace(spec=spec, token_to_id=words.index)
    tokens, kinds = _token_table(tok, len(words), byte_tokens=False)
    for text in looking:
        assert (tokens[words.index(text)], kinds[words.index(text)]) == (
            text, gguf.TokenType.CONTROL)
    assert (tokens[-1], kinds[-1]) == ("plain word", gguf.TokenType.USER_DEFINED)


def test_a_token_no_merge_makes_is_named_in_a_warning(checkpoints, tmp_path, capsys):
    """llama.cpp's SPM tokenizer joins any two pieces whose text is a token, HF only the pairs its
    merges list: an export of a vocabulary holding a token no merge makes says so, naming it;
    a vocabulary whose every token a merge makes exports without a word."""
    _export(checkpoints["mistral"], tmp_path)
    assert "warning" not in capsys.readouterr().err
    changed = tmp_path / "changed"
    shutil.copytree(checkpoints["mistral"], changed)
    spec = json.loads((changed / "tokenizer.json").read_text())
    merge = spec["model"]["merges"].pop()
    token = "".join(merge.split(" ") if isinstance(merge, str) else merge)
    (changed / "tokenizer.json").write_text(json.dumps(spec))
    assert gguf_writer.unmade_tokens(spec) == [token]
    (tmp_path / "out").mkdir()
    _export(changed, tmp_path / "out")
    err = capsys.readouterr().err
    assert "no merge makes 1" in err and repr(token) in err and "llama.cpp" in err


def test_llama_tensors_hold_the_weights_with_q_and_k_rows_interleaved(checkpoints, tmp_path):
    """llama.cpp's llama rotates neighbouring pairs: q and k rows go from HF's halves to pairs,
    every other tensor is the HF weight as it is; the tied head is not written twice; the
    llama3 scaling's per-frequency divisors ride along as rope_freqs."""
    from safetensors.torch import load_file

    hf = load_file(checkpoints["llama"] / "model.safetensors")
    cfg = pretrained.load(checkpoints["llama"]).cfg
    reader = gguf.GGUFReader(_export(checkpoints["llama"], tmp_path))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight"]
    head = cfg.head_dim
    halves = q.view(cfg.n_head, head // 2, 2, -1).transpose(1, 2).reshape(q.shape)
    assert torch.equal(halves, hf["model.layers.0.self_attn.q_proj.weight"])
    k = tensors["blk.1.attn_k.weight"]
    halves = k.view(cfg.n_kv_head, head // 2, 2, -1).transpose(1, 2).reshape(k.shape)
    assert torch.equal(halves, hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], hf["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    assert "output.weight" not in tensors
    assert tensors["rope_freqs.weight"].shape == (head // 2,)
    assert tensors["rope_freqs.weight"][0] == 1 and tensors["rope_freqs.weight"][-1] == 32


@pytest.mark.parametrize("outtype, tol", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_each_outtype_holds_the_weights_to_its_precision(outtype, tol, checkpoints, tmp_path):
    """f16, bf16 and q8_0 files dequantize to the model's weights within each type's rounding:
    matrices in the type asked for, vectors (norms, biases) F32, as llama.cpp's converter writes
    them."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(_export(checkpoints["qwen2"], tmp_path, outtype))
    model = pretrained.load(checkpoints["qwen2"])
    want = gguf_writer.gguf_tensors(model)
    kinds = set()
    for t in reader.tensors:
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(want[t.name].shape)
        err = (got - want[t.name]).abs().max() / want[t.name].abs().max()
        assert err <= tol, (t.name, err)
        kinds.add((t.tensor_type.name, len(want[t.name].shape)))
    assert kinds == {(outtype.upper(), 2), ("F32", 1)}


@pytest.mark.parametrize("outtype, value, kind", [("f16", 1e5, "F32"), ("q8_0", 1e5, "Q8_0"),
                                                  ("q8_0", 1e7, "F32")])
def test_a_matrix_past_f16s_range_is_written_f32_not_inf(outtype, value, kind, checkpoints,
                                                         tmp_path, capsys):
    """f16 holds up to 65504 and q8_0's block scales are f16: a matrix holding a value past what
    the outtype holds is written f32, named in a warning, and dequantizes to the model's weights
    (no inf); one q8_0's scales hold stays q8_0."""
    from gguf.quants import dequantize

    model = pretrained.load(checkpoints["qwen2"])
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = value
    want = gguf_writer.gguf_tensors(model)["blk.0.ffn_up.weight"]
    out = gguf_writer.write_gguf(model, load_tokenizer(checkpoints["qwen2"]),
                                 tmp_path / "model.gguf", outtype)
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    got = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).reshape(want.shape)
    assert tensor.tensor_type.name == kind
    assert torch.isfinite(got).all()
    assert ((got - want).abs().max() / value).item() <= 1e-2
    warned = "blk.0.ffn_up.weight" in capsys.readouterr().err
    assert warned == (kind == "F32")


@pytest.mark.parametrize("task, init_from, data_options, fills", [
    ("fim", None, {}, True),  # fim_rate's default: half the chunks are FIM examples
    ("fim", None, {"fim_rate": 0.1}, True),
    ("fim", None, {"fim_rate": 0}, False),  # every chunk a plain LM chunk
    ("lm", None, {}, False),
    ("lm", "base", {}, True),  # the checkpoint it started from may have learned FIM
    ("fim", "base", {"fim_rate": 0}, True),
])
def test_a_modelfile_fills_in_the_middle_only_for_a_model_that_may_have_learned_it(
        task, init_from, data_options, fills):
    """A run from scratch learned FIM only under the fim task with a fim_rate above 0; a run
    from a checkpoint keeps what that checkpoint learned: its Modelfile's FIM template (Ollama's
    suffix prompts) is written only for those."""
    assert gguf_writer.fills_in_middle(task, init_from, data_options) is fills

def test_a_modelfile_completes_and_fills_in_the_middle_with_the_tokenizers_tokens(checkpoints,
                                                                                   tmp_path):
    """The Modelfile beside the file points Ollama at it, wraps a prompt that has a suffix in the
    tokenizer's own FIM tokens (plain completion without one) and stops at its eos: Ollama
    completes and fills in the middle with the export as it is."""
    out = _export(checkpoints["starcoder2"], tmp_path)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{out.name}\n")
    assert ('TEMPLATE """{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}'
            '<fim_middle>{{- else }}{{ .Prompt }}{{- end }}"""') in text
    assert 'PARAMETER stop "<|endoftext|>"' in text


def test_the_cli_writes_the_file_and_says_how_to_run_it(checkpoints, tmp_path, capsys,
                                                        monkeypatch):
    """The file and its Modelfile, and how Ollama takes them; a run named alone (as eval.py's
    --models takes it) is the one under --runs-dir."""
    out = tmp_path / "coder.gguf"
    assert export_gguf.main([str(checkpoints["qwen2"]), str(out), "--outtype", "q8_0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "coder.gguf"]
    assert "ollama create" in capsys.readouterr().out
    shutil.copytree(checkpoints["qwen2"], tmp_path / "runs" / "small")
    monkeypatch.chdir(tmp_path)
    assert export_gguf.main(["small", "small.gguf", "--runs-dir", "runs"]) == 0
    assert "small: runs/small (under --runs-dir)" in capsys.readouterr().err
    assert (tmp_path / "small.gguf").is_file()


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory no file can be created in: chmod 0o555, or procfs for root (whom the
    permission bits do not bind)."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    return ro


def _written(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(checkpoints, tmp_path,
                                                                          capsys):
    """An output that is a directory, or inside a directory no file can be created in, is one
    line and exit 2, and no temporary file is left behind."""
    existing = tmp_path / "out.gguf"
    existing.mkdir()
    read_only = _read_only_dir(tmp_path) / "a.gguf"
    before = _written(tmp_path)
    for out, said in ((existing, "a directory"), (read_only, str(read_only))):
        assert export_gguf.main([str(checkpoints["qwen2"]), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    assert _written(tmp_path) == before
    # procfs lists the machine's processes as they come and go: only an export's names count
    assert [name for name in _written(read_only.parent) if "gguf" in name or "Modelfile" in name
            ] == []
    assert _written(existing) == []


@pytest.mark.parametrize("failure, code, said", [
    (OSError(28, "No space left on device"), 2, "No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted: nothing written"),
])
def test_a_write_that_fails_midway_leaves_no_file(failure, code, said, checkpoints, tmp_path,
                                                  capsys, monkeypatch):
    """A failure or a stop after the header and the vocabulary are written leaves neither the
    .gguf, nor its Modelfile, nor the half-written temporary file."""
    def fail(writer, progress=False):
        raise failure

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    out = tmp_path / "out" / "a.gguf"
    out.parent.mkdir()
    assert export_gguf.main([str(checkpoints["qwen2"]), str(out)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err
    assert _written(out.parent) == []


def test_the_start_token_llama_cpp_adds_is_the_one_prompts_open_with(capsys):
    """No start: none added (the tokenizer's BOS id kept); one: that one added; two (an lm
    run's end of text before a template's BOS): the last, which llama.cpp can add, with a
    warning naming both."""
    from types import SimpleNamespace

    tok = SimpleNamespace(bos_id=1, decode=lambda ids: {0: "<eos>", 1: "<bos>"}[ids[0]])
    assert gguf_writer._start_token(tok, []) == (1, False)
    assert gguf_writer._start_token(tok, [0]) == (0, True)
    assert capsys.readouterr().err == ""
    assert gguf_writer._start_token(tok, [0, 1]) == (1, True)
    assert "open with 2 tokens ('<eos>', '<bos>'); llama.cpp adds one" in capsys.readouterr().err


def test_the_writer_removes_its_file_on_any_failure(checkpoints, tmp_path, monkeypatch):
    """``save`` below the command line (the end of a run calls it): a directory in the way is a
    ValueError naming it, any other exception passes through, and neither leaves a file."""
    model = pretrained.load(checkpoints["qwen2"])
    tok = load_tokenizer(checkpoints["qwen2"] / "tokenizer.json")
    (tmp_path / "a.gguf").mkdir()
    with pytest.raises(ValueError, match=r"a\.gguf: cannot write \(Is a directory\)"):
        gguf_writer.save(model, tok, tmp_path / "a.gguf", "f32")
    assert _written(tmp_path) == ["a.gguf"]

    def fail(writer, progress=False):
        raise RuntimeError("injected")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="injected"):
        gguf_writer.save(model, tok, tmp_path / "b.gguf", "f32")
    assert _written(tmp_path) == ["a.gguf"]


def test_another_exports_modelfile_is_kept_and_the_new_one_named_after_its_file(checkpoints,
                                                                                 tmp_path, capsys):
    """Two exports into one directory: the second's Modelfile is NAME.Modelfile beside its
    .gguf, the first's stays (the line says so); an export written again rewrites its own."""
    source = str(checkpoints["qwen2"])
    for name in ("a.gguf", "b.gguf"):
        assert export_gguf.main([source, str(tmp_path / name)]) == 0
    said = capsys.readouterr().out
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./a.gguf\n")
    assert (tmp_path / "b.Modelfile").read_text().startswith("FROM ./b.gguf\n")
    assert f"and {tmp_path / 'b.Modelfile'} ({tmp_path / 'Modelfile'} runs another" in said
    assert f"ollama create NAME -f {tmp_path / 'b.Modelfile'}" in said
    assert export_gguf.main([source, str(tmp_path / "a.gguf")]) == 0
    assert f"ollama create NAME -f {tmp_path / 'Modelfile'}\n" in capsys.readouterr().out
    assert _written(tmp_path) == ["Modelfile", "a.gguf", "b.Modelfile", "b.gguf"]
    (tmp_path / "Modelfile").write_text("FROM llama3\nPARAMETER temperature 0\n")
    assert export_gguf.main([source, str(tmp_path / "a.gguf")]) == 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM llama3\n")
    assert (tmp_path / "a.Modelfile").read_text().startswith("FROM ./a.gguf\n")


def _with_tokenizer(checkpoint: Path, path: Path, change) -> Path:
    """A copy of ``checkpoint`` whose tokenizer.json ``change`` edits in place."""
    shutil.copytree(checkpoint, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    change(spec)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


def test_bad_input_is_one_line_naming_what_and_why(checkpoints, tmp_path, capsys):
    """A checkpoint llama.cpp has no architecture for, an output that is no NAME.gguf, a missing
    checkpoint, or a tokenizer llama.cpp would tokenize otherwise (an NFKC normalizer, no byte
    fallback) is one line of error, exit 2, naming which and why; missing directories are made."""
    codegen = tmp_path / "codegen"
    tokenizer = checkpoints["phi"] / "tokenizer.json"
    tok = load_tokenizer(tokenizer)  # its eos the config's, as CodeGen-350M's 50256
    save_tiny_hf("codegen", codegen, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    (codegen / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    nfkc = _with_tokenizer(checkpoints["mistral"], tmp_path / "nfkc", lambda spec: spec.update(
        normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, spec["normalizer"]]}))
    no_bytes = _with_tokenizer(checkpoints["mistral"], tmp_path / "no_bytes",
                               lambda spec: spec["model"].update(byte_fallback=False))
    # a byte-level BPE with a normalizer llama.cpp's BPE would not apply (Qwen2's NFC it takes)
    byte_nfkc = _with_tokenizer(checkpoints["qwen2"], tmp_path / "byte_nfkc",
                                lambda spec: spec.update(normalizer={"type": "NFKC"}))
    capsys.readouterr()
    cases = [
        ([str(codegen), str(tmp_path / "a.gguf")], r"family 'codegen'.*no architecture"),
        ([str(checkpoints["llama"]), str(tmp_path / "a.bin" / "x" / "a.gguf")],
         r"a\.bin is a file, not a directory"),
        ([str(checkpoints["llama"]), str(tmp_path / "a.bin")], r"NAME\.gguf"),
        ([str(tmp_path / "missing"), str(tmp_path / "a.gguf")], r"export-gguf .*missing"),
        ([str(nfkc), str(tmp_path / "a.gguf")], r"normalizer step NFKC.*spaces"),
        ([str(no_bytes), str(tmp_path / "a.gguf")], r"without byte_fallback.*<0xNN>"),
        ([str(byte_nfkc), str(tmp_path / "a.gguf")], r"normalizer step NFKC.*byte-level"),
    ]
    (tmp_path / "a.bin").write_text("")
    for argv, message in cases:
        assert export_gguf.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert re.search(message, err), err
    deep = tmp_path / "new" / "deep" / "a.gguf"  # its directories are made, as a run's are
    assert export_gguf.main([str(checkpoints["llama"]), str(deep)]) == 0 and deep.is_file()


def test_a_codelm_tokenizer_is_refused_with_what_to_use_instead():
    """codelm's own CodeTokenizer matches pieces greedily, which no llama.cpp tokenizer does: the
    export refuses it, naming --tokenizer as the way to a tokenizer llama.cpp reads."""
    tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 20, min_freq=2)
    model = Transformer(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"CodeTokenizer.*--tokenizer"):
        gguf_writer.check_exportable(model, tok)


# ---- llama.cpp itself ------------------------------------------------------------------------

LLAMA_CPP = Path.home() / ".cache" / "codelm" / "llama-cpp-python"


def _llama_cpp():
    """llama-cpp-python, built from the registry's source once into a cache directory."""
    if not (LLAMA_CPP / "llama_cpp").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                        str(LLAMA_CPP), "llama-cpp-python"], check=True,
                       env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())})
    sys.path.append(str(LLAMA_CPP))  # after the environment's own packages (numpy)
    import llama_cpp

    return llama_cpp


def _context(path: Path) -> int:
    """The export's context length: a window llama.cpp ignores caps it."""
    reader = gguf.GGUFReader(path)
    return int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length"))


def _llama(llama_cpp, path: Path):
    return llama_cpp.Llama(str(path), n_ctx=_context(path), verbose=False, logits_all=True)


def _held_out(chars: int) -> list[str]:
    return [p.read_text("utf-8", "replace")[:chars] for p in stdlib_files()[7::97]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_reads_codelms_ids_and_continues_as_codelm(name, checkpoints, tmp_path):
    """An f32 export: llama.cpp's ids on held-out code are codelm's, and so are its 24 greedy
    tokens."""
    from codelm.models.generation import GenerationConfig, generate

    llama_cpp = _llama_cpp()
    tok = load_tokenizer(checkpoints[name])
    model = pretrained.load(checkpoints[name]).eval()
    llm = _llama(llama_cpp, _export(checkpoints[name], tmp_path))
    for text in _held_out(2000):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    prompt = tok.encode("def fibonacci(n):\n    ")
    ours = generate(model, torch.tensor([prompt]), GenerationConfig(max_new_tokens=24))
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 24:
            break
    assert theirs == ours[0, len(prompt):].tolist()


def top1_agreement(llm, model: Transformer, texts: list[list[int]]) -> float:
    """The share of positions where llama.cpp's most likely next token is codelm's."""
    same = 0
    total = 0
    for ids in texts:
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].argmax(-1)
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[: len(ids)].copy()).argmax(-1)
        same += int((ours == theirs).sum())
        total += len(ids)
    return same / total


@pytest.mark.slow
@pytest.mark.parametrize("outtype, least", [("f16", 0.99), ("q8_0", 0.9)])
@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_picks_codelms_top_token_on_most_positions(name, outtype, least, checkpoints,
                                                             tmp_path):
    """f16 and q8_0 exports: on held-out code llama.cpp's top-1 next token is codelm's (fp32) at
    ``least`` of the positions (docs/training.md states the rates measured)."""
    llama_cpp = _llama_cpp()
    tok = load_tokenizer(checkpoints[name])
    model = pretrained.load(checkpoints[name]).eval()
    out = _export(checkpoints[name], tmp_path, outtype)
    texts = [tok.encode(text)[: _context(out)] for text in _held_out(4000)]
    llm = _llama(llama_cpp, out)
    assert top1_agreement(llm, model, texts) >= least


def test_an_adapter_is_merged_into_its_base_before_writing(checkpoints, tmp_path):
    """BASE+ADAPTER (as eval.py takes it) exports the merged weights: q rows carry the update."""
    from codelm.models.adapter_config import LoRAConfig
    from lora import apply_lora, merge_lora, save_adapter

    model = pretrained.load(checkpoints["llama"])
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model)
    merged = model.blocks[0].attn.qkv.base.weight[: model.cfg.n_head * model.cfg.head_dim]
    out = export_gguf.export(f"{checkpoints['llama']}+{tmp_path / 'adapter'}",
                             tmp_path / "tuned.gguf", "f32")
    q = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    q = torch.from_numpy(q.data.copy())
    halves = q.view(model.cfg.n_head, model.cfg.head_dim // 2, 2, -1).transpose(1, 2)
    torch.testing.assert_close(halves.reshape(q.shape), merged, rtol=0, atol=1e-6)
    original = pretrained.load(checkpoints["llama"]).blocks[0].attn.qkv.weight[: q.shape[0]]
    assert not torch.allclose(merged, original, atol=1e-3)


# ---- --export-gguf at the end of a training run ----------------------------------------------

def _corpus(path: Path) -> Path:
    """A few small stdlib files: data for a short run."""
    path.mkdir()
    files = [f for f in stdlib_files() if 1500 < f.stat().st_size < 5000][:12]
    for i, f in enumerate(files):
        shutil.copy(f, path / f"f{i:03d}.py")
    return path


def _run_config(tmp_path: Path, **overrides):
    values = dict(data=[str(_corpus(tmp_path / "corpus"))], block_size=32, batch_size=4,
                  max_steps=3, warmup_steps=1, lr=3e-2, eval_every=3, eval_examples=4,
                  progress=False, report_to=["none"], out_dir=str(tmp_path / "runs"),
                  name="run", sample_tokens=4, precision="fp32",
                  data_options={"cache_dir": str(tmp_path / "cache"), "progress": False})
    return trainconfig.TrainConfig(**{**values, **overrides})


def test_a_from_scratch_run_trains_a_bpe_that_hf_and_gguf_read_as_it_does(tmp_path):
    """--tokenizer-kind bpe: the from-scratch run's trained byte-level BPE gives HF tokenizers'
    and transformers' ids on held-out code, its end of text and FIM tokens are the model's, and
    --export-gguf writes it (llama.cpp's starcoder pre-tokenizer, each id's token), with the
    start token eval.py puts before a prompt as the one llama.cpp adds (both exports); the
    default CodeTokenizer's run is refused GGUF export, naming the kind."""
    import transformers
    from tokenizers import Tokenizer

    import trainingmanager as tm

    cfg = _run_config(tmp_path, preset="tiny", tokenizer_kind="bpe", tokenizer_max_vocab=300,
                      tokenizer_min_freq=2, export_gguf="f16")
    plan.validate_config(cfg)
    run = tm.train(cfg).run_dir
    ours = load_tokenizer(run)
    assert ours.vocab_size == 7 + 256 + 300
    held_out = (Path(json.__file__).parent / "decoder.py").read_text("utf-8")
    ids = ours.encode(held_out)
    assert Tokenizer.from_file(str(run / "tokenizer.json")).encode(held_out).ids == ids
    hf = transformers.AutoTokenizer.from_pretrained(run / "export")
    assert hf(held_out)["input_ids"] == ids and hf.eos_token == "<|endoftext|>"
    assert ours.token_to_id("<fim_prefix>") == ours.fim_prefix_id is not None
    reader = gguf.GGUFReader(run / "export" / "model.gguf")
    assert _field(reader, "tokenizer.ggml.pre") == "starcoder"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [ours.id_to_token(i) for i in range(ours.vocab_size)]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == ours.eos_id
    start = loading.load_model(str(run), "cpu").prompt_start  # eval's and the server's
    assert start == [ours.eos_id]  # the lm task packs each file after an end of text
    for written in (reader, gguf.GGUFReader(export_gguf.export(str(run), tmp_path / "cli.gguf",
                                                               "f16"))):
        assert _field(written, "tokenizer.ggml.add_bos_token") is True
        assert _field(written, "tokenizer.ggml.bos_token_id") == start[0]
    # trained from scratch on the lm task, it never learned to fill in the middle: its
    # Modelfiles complete the prompt alone (the FIM tokens still stop a generation)
    for recipe in (run / "export" / "Modelfile", tmp_path / "Modelfile"):
        text = recipe.read_text()
        assert 'TEMPLATE """{{ .Prompt }}"""\n' in text and "Suffix" not in text, text
        assert 'PARAMETER stop "<|endoftext|>"' in text
    with pytest.raises(ValueError, match=r"tokenizer_kind bpe .*or export_gguf none"):
        plan.validate_config(dataclasses.replace(cfg, tokenizer_kind="code"))
    with pytest.raises(ValueError, match=r"tokenizer_kind.*comes from init_from or tokenizer"):
        plan.validate_config(dataclasses.replace(cfg, tokenizer=str(run / "tokenizer.json"),
                                                 export_gguf=None))


def test_a_lora_run_with_export_gguf_writes_its_merged_weights_and_a_modelfile(checkpoints,
                                                                               tmp_path, capsys):
    """--export-gguf f32 on a LoRA run: export/model.gguf holds, as gguf's reader reads it, the
    base's tensors with W + alpha/r * B @ A added from the PEFT adapter files the run wrote
    (llama's q and k rows interleaved), and export/Modelfile runs it."""
    from safetensors.torch import load_file

    import trainingmanager as tm

    base = checkpoints["llama"]
    cfg = _run_config(tmp_path, init_from=str(base), lora_r=4, lora_alpha=8.0,
                      export_gguf="f32")
    plan.validate_config(cfg)
    export = tm.train(cfg).run_dir / "export"
    want = load_file(base / "model.safetensors")
    adapter = load_file(export / "adapter_model.safetensors")
    scale = 8.0 / 4
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.", ".")
            want[name] = want[name] + scale * b @ a
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())
    cfg_model = pretrained.load(base).cfg
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg_model.n_layer)
    reader = gguf.GGUFReader(export / "model.gguf")
    got = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    heads = {"q_proj": cfg_model.n_head, "k_proj": cfg_model.n_kv_head}
    compared = 0
    for hf_name, tensor in want.items():
        if hf_name == "lm_head.weight" and cfg_model.tie_embeddings:
            continue
        ours = got[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        proj = hf_name.split(".")[-2]
        if proj in heads:  # llama.cpp's pairs back to HF's halves
            n = heads[proj]
            ours = ours.view(n, cfg_model.head_dim // 2, 2, -1).transpose(1, 2).reshape(ours.shape)
        torch.testing.assert_close(ours, tensor, rtol=0, atol=1e-6, msg=hf_name)
        compared += 1
    assert compared == len(got) - ("rope_freqs.weight" in got)
    assert (export / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    said = capsys.readouterr().out
    assert f"ollama create NAME -f {export / 'Modelfile'}" in said
    assert f"the adapter merged into {base}" in said  # which base the file holds
    assert "merged into" not in gguf_writer.ollama_hint(export / "model.gguf", "f16")


def test_export_gguf_is_refused_before_training_naming_the_setting(checkpoints, tmp_path,
                                                                   capsys):
    """A from-scratch run training codelm's CodeTokenizer, as its settings are read; a family
    llama.cpp lacks, as its checkpoint's config is read; a CodeTokenizer file given as the
    tokenizer, once loaded: one line naming export_gguf, and no run directory left."""
    from tiny_hf import save_tiny_hf

    import trainingmanager as tm

    codegen = tmp_path / "codegen"
    save_tiny_hf("codegen", codegen, vocab_size=load_tokenizer(checkpoints["phi"]).vocab_size)
    shutil.copy(checkpoints["phi"] / "tokenizer.json", codegen / "tokenizer.json")
    code_tokenizer = tmp_path / "code_tokenizer"
    CodeTokenizer.train(["def f(x):\n    return x\n"] * 20, min_freq=2).save(code_tokenizer)
    corpus = _corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    common = ["--max-steps", "2", "--out-dir", str(runs), "--export-gguf", "f16", "--no-progress",
              "--data", str(corpus), "--block-size", "32", "--data-options",
              json.dumps({"cache_dir": str(tmp_path / "cache"), "progress": False})]
    for argv, words in ((["--preset", "tiny"], ("CodeTokenizer", "--tokenizer")),
                        (["--init-from", str(codegen), "--lora-r", "4"], ("codegen",)),
                        (["--preset", "tiny", "--tokenizer", str(code_tokenizer)],
                         ("CodeTokenizer", "--tokenizer"))):
        capsys.readouterr()
        assert tm.main([*argv, *common]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        for word in ("export_gguf", "--export-gguf", *words):
            assert word in err, err
        assert not runs.exists() or not any(runs.iterdir())


def test_the_runs_choices_are_the_writers_outtypes():
    """trainingmanager's --export-gguf offers exactly the writer's outtypes: a run can ask for
    every type the export writes and none it does not."""
    flag = next(a for a in trainconfig.build_parser()._actions
                if "--export-gguf" in a.option_strings)
    assert [c for c in flag.choices if c is not None] == list(families.OUTTYPES)


@pytest.mark.parametrize("family, overrides, message", [
    ("gpt_bigcode", dict(multi_query=False), r"4 key/value heads.*multi-query"),
    ("gemma2", dict(attn_logit_softcapping=None, query_pre_attn_scalar=32), r"soft-capping.*always soft-caps"),
    ("gemma2", dict(final_logit_softcapping=None, query_pre_attn_scalar=32), r"soft-capping.*always soft-caps"),
    ("gemma2", dict(sliding_window=None, query_pre_attn_scalar=32), r"every other layer"),
    ("gemma", dict(tie_word_embeddings=False), r"tie_word_embeddings false.*token embedding"),
    ("gemma2", dict(tie_word_embeddings=False, query_pre_attn_scalar=32),
     r"tie_word_embeddings false.*token embedding"),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0,
                                 "original_max_position_embeddings": 64}),
     r"yarn with beta_fast=8.0.*factor and original context only"),
])
def test_a_model_llama_cpp_would_compute_otherwise_is_refused_before_writing(
        family, overrides, message, tmp_path):
    """llama.cpp's starcoder reads a multi-query fused qkv only, its gemma2 always soft-caps
    (50 and 30 where the file names nothing) and slides every other layer, its gemma and gemma2
    compute the logits with the token embedding (a separate lm_head has no place in the file),
    and its GGUF keys carry YaRN's factor and original context only: a file of such a model
    would not load or would compute another model, so the export refuses it, naming the
    setting."""
    from tiny_hf import tiny_hf_config

    tiny_hf_config(family, **overrides).save_pretrained(tmp_path)
    cfg, _ = families.read_config(tmp_path)
    with pytest.raises(ValueError, match=message):
        families.check_architecture(cfg)


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_a_tied_head_is_written_as_output_weight_where_llama_cpp_loads_one(family, tmp_path):
    """llama.cpp's phi2 and stablelm load output.weight whatever the config ties (no fallback
    to token_embd), so a tied model's head goes in as the embedding once more: the logits'
    matrix and bias are transformers' output embedding."""
    from tiny_hf import save_tiny_hf

    hf = save_tiny_hf(family, tmp_path, tie_word_embeddings=True)
    tensors = gguf_writer.gguf_tensors(pretrained.load(tmp_path))
    head = hf.get_output_embeddings()
    assert torch.equal(tensors["output.weight"], head.weight.float())
    assert torch.equal(tensors["token_embd.weight"], head.weight.float())
    if head.bias is not None:
        assert torch.equal(tensors["output.bias"], head.bias.float())


def test_an_instruct_models_chat_template_is_written_for_llama_cpp_and_ollama(tmp_path):
    """The tokenizer's chat template goes under tokenizer.chat_template, as llama.cpp's
    converter writes it (gguf's SpecialVocab reads the same template from the HF directory),
    and the Modelfile names no TEMPLATE of its own, so that Ollama takes the GGUF's."""
    from tiny_hf import save_tiny_llama3_instruct

    save_tiny_llama3_instruct(tmp_path / "instruct", _texts()[:20])
    out = export_gguf.export(str(tmp_path / "instruct"), tmp_path / "chat.gguf", "f32")
    reader = gguf.GGUFReader(out)
    want = gguf.SpecialVocab(tmp_path / "instruct").chat_template
    assert want and _field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) == want
    recipe = (tmp_path / "Modelfile").read_text()
    assert recipe.startswith("FROM ./chat.gguf\n") and "TEMPLATE" not in recipe


def test_named_chat_templates_are_written_as_llama_cpps_converter_writes_them(tmp_path):
    """tokenizer_config.json's list of named templates (default and tool_use, as Hermes and
    Command-R ship): every one goes into the GGUF as gguf-py writes the list llama.cpp's
    converter reads (SpecialVocab): tokenizer.chat_template, tokenizer.chat_template.tool_use
    and tokenizer.chat_templates."""
    from tiny_hf import save_tiny_llama3_instruct

    directory = tmp_path / "instruct"
    save_tiny_llama3_instruct(directory, _texts()[:20])
    config = json.loads((directory / "tokenizer_config.json").read_text())
    tool_use = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}{{ tools }}"
    config["chat_template"] = [{"name": "default", "template": config["chat_template"]},
                               {"name": "tool_use", "template": tool_use}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = gguf.GGUFReader(export_gguf.export(str(directory), tmp_path / "chat.gguf", "f32"))
    reference = gguf.GGUFWriter(tmp_path / "reference.gguf", "llama")
    gguf.SpecialVocab(directory).add_to_gguf(reference)
    reference.write_header_to_file()
    reference.write_kv_data_to_file()
    reference.close()
    theirs = gguf.GGUFReader(tmp_path / "reference.gguf")
    keys = [gguf.Keys.Tokenizer.CHAT_TEMPLATE, gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(
        name="tool_use")]
    for key in keys:
        assert _field(ours, key) == _field(theirs, key) and _field(ours, key)
    assert _field(ours, gguf.Keys.Tokenizer.CHAT_TEMPLATES) == ["tool_use"]


def test_a_path_with_a_space_is_quoted_in_the_modelfile_and_its_hint(checkpoints, tmp_path,
                                                                     capsys):
    """A FROM path holding a space is quoted (Ollama reads it whole), an export written again
    rewrites its own Modelfile, and the printed command pastes into a shell."""
    where = tmp_path / "sp ace"
    where.mkdir()
    for _ in range(2):
        assert export_gguf.main([str(checkpoints["qwen2"]), str(where / "my model.gguf")]) == 0
    assert _written(where) == ["Modelfile", "my model.gguf"]
    assert (where / "Modelfile").read_text().startswith('FROM "./my model.gguf"\n')
    said = capsys.readouterr().out
    assert f"ollama create NAME -f '{where / 'Modelfile'}'" in said
    assert "runs another" not in said


def test_position_embeddings_stay_f32_as_llama_cpps_converter_keeps_them(checkpoints,
                                                                          tmp_path):
    """In a q8_0 file a learned position-embedding table stays F32 while the token embedding is
    quantized, as llama.cpp's convert_hf_to_gguf writes it."""
    reader = gguf.GGUFReader(_export(checkpoints["gpt_bigcode"], tmp_path, "q8_0"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["position_embd.weight"] == "F32" and kinds["token_embd.weight"] == "Q8_0"


def test_a_qlora_run_without_its_export_writes_the_adapter_merged_into_the_unquantized_base(
        checkpoints, tmp_path):
    """A QLoRA run stopped before its export: python -m codelm.gguf RUN loads best/'s adapter
    onto the base as its checkpoint holds it (not quantized) and merges it, as the run's own
    --export-gguf does: the tensors equal the export's model.gguf."""
    import trainingmanager as tm

    cfg = _run_config(tmp_path, init_from=str(checkpoints["llama"]), lora_r=4, lora_alpha=8.0,
                      quantize_bits=4, export_gguf="f32")
    plan.validate_config(cfg)
    run = tm.train(cfg).run_dir
    shutil.move(run / "export", tmp_path / "export")
    out = export_gguf.export(str(run), tmp_path / "late.gguf", "f32")
    got = {t.name: t.data.copy() for t in gguf.GGUFReader(out).tensors}
    want = {t.name: t.data.copy() for t in gguf.GGUFReader(tmp_path / "export" / "model.gguf")
            .tensors}
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(torch.from_numpy(got[name]), torch.from_numpy(tensor),
                                   rtol=0, atol=1e-6, msg=name)
