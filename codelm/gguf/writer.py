"""GGUF export: a model (LoRA merged) written as one .gguf file that llama.cpp, Ollama and LM
Studio run, its tokenizer inside, with an Ollama Modelfile beside it (``save``). The command
line, which loads any model eval.py loads, is codelm.gguf's (``python -m codelm.gguf``); a run's
``--export-gguf`` writes export/model.gguf through ``save`` (codelm.training.finish).

Written through ``gguf``, llama.cpp's own writer: its tensor-name tables map the HF names,
the metadata keys are llama.cpp's, and LoRA adapters are merged first. q4 and the other k-quants
come from llama.cpp's quantizer run on an f16 export (docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

import lora
from architecture import Transformer, rope_attention_factor, rope_inv_freq
from codelm.models import pretrained
from codelm.models.families import GGUF_FAMILIES, GgufFamily, check_architecture, context_length
from codelm.runtime import process
from codelm.tokenization.bpe import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    STARCODER_PATTERN,
    BPETokenizer,
)
from codelm.tokenization.chat import named_chat_templates
from codelm.tokenization.spiece import SPIECE_SPACE

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte fallback: <0x0A>
# The pre-tokenizer (llama.cpp's tokenizer.ggml.pre) of each Split regex codelm reads.
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", STARCODER_PATTERN: "starcoder",
                  LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}


def check_exportable(model: Transformer, tok) -> None:
    """Refuse, naming the reason, a model llama.cpp would run differently."""
    check_architecture(model.cfg)
    _tokenizer_kind(tok)


def _tokenizer_kind(tok) -> str:
    """llama.cpp's tokenizer model for ``tok``: "gpt2" (byte-level BPE, its merges and a
    pre-tokenizer llama.cpp knows by name, no normalizer but Qwen2's NFC) or "llama"
    (SentencePiece-style BPE: spaces as ▁, <0xNN> byte fallback); anything else is refused,
    naming why."""
    if not isinstance(tok, BPETokenizer):
        raise ValueError(
            f"tokenizer {type(tok).__name__}: GGUF export writes HF BPE tokenizers "
            "(tokenizer.json, byte-level or SentencePiece-style); a from-scratch model's "
            "CodeTokenizer matches pieces greedily, which llama.cpp's tokenizers cannot express: "
            "train with --tokenizer-kind bpe (a byte-level BPE trained on the data), or "
            "--tokenizer TOKENIZER.json (an HF BPE), to run the model in llama.cpp")
    if tok.pattern is None:
        _space_prefix(tok.spec)
        return "llama"
    if _pre_tokenizer(tok) is None:
        raise ValueError("tokenizer: its pre-tokenizer regex is none of llama.cpp's (gpt-2, "
                         "starcoder, llama-bpe, qwen2)")
    for step in _normalizer_steps(tok.spec.get("normalizer")):
        if step["type"] != "NFC":  # Qwen2's NFC: llama.cpp's converter writes it as this does
            raise ValueError(f"tokenizer: normalizer step {step['type']}: llama.cpp's byte-level "
                             "BPE applies no normalizer, so it would tokenize text differently")
    return "gpt2"


def _pre_tokenizer(tok) -> str | None:
    return PRE_TOKENIZERS.get(tok.pattern)


def _normalizer_steps(spec: dict | None) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [step for inner in spec["normalizers"] for step in _normalizer_steps(inner)]
    return [spec]


def _space_prefix(spec: dict) -> bool:
    """Whether a ▁ goes before the text (llama.cpp's add_space_prefix), for a SentencePiece-style
    tokenizer.json that llama.cpp's SPM tokenizer reads alike. That tokenizer turns each space
    into ▁ and nothing else, merges over the whole text, and writes a character outside the
    vocabulary as its UTF-8 bytes' <0xNN> tokens; so the normalizer may only prepend ▁ and
    replace spaces with it, a Metaspace that splits at every ▁ needs a vocabulary with ▁ only
    at a token's start, and all 256 byte tokens must be there."""
    model = spec["model"]
    if not model.get("byte_fallback"):
        raise ValueError("tokenizer: SentencePiece-style BPE without byte_fallback: llama.cpp "
                         "writes characters outside the vocabulary as <0xNN> byte tokens")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:
        raise ValueError(f"tokenizer: {len(missing)} of the 256 byte tokens <0xNN> missing "
                         f"(<0x{missing[0]:02X}> first): llama.cpp's byte fallback needs them all")
    prefix = False
    spaces = False
    for step in _normalizer_steps(spec.get("normalizer")):
        if step["type"] == "Prepend" and step["prepend"] == SPIECE_SPACE:
            prefix = True
        elif step["type"] == "Replace" and (step["pattern"]["String"], step["content"]) == (
                " ", SPIECE_SPACE):
            spaces = True
        else:
            raise ValueError(f"tokenizer: normalizer step {step['type']}: llama.cpp's "
                             "SentencePiece tokenizer only turns spaces into \u2581")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        spaces = True
        legacy = "always" if pre.get("add_prefix_space", True) else "never"
        prefix = prefix or pre.get("prepend_scheme", legacy) != "never"
        if pre.get("split", True) and any(SPIECE_SPACE in t[1:] for t in model["vocab"]):
            raise ValueError("tokenizer: Metaspace split=true with tokens holding \u2581 after "
                             "their start: llama.cpp merges across spaces")
    if not spaces:
        raise ValueError("tokenizer: SentencePiece-style BPE that keeps spaces: llama.cpp's "
                         "SentencePiece tokenizer reads them as \u2581")
    return prefix


def _metadata(writer, cfg, family: GgufFamily) -> None:
    """The architecture's hyperparameters, under llama.cpp's keys."""
    writer.add_context_length(context_length(cfg, family))
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)
    if cfg.positions == "rope":
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif scaling.get("rope_type") == "longrope":  # as llama.cpp's Phi-3 converter writes it
        writer.add_rope_scaling_attn_factors(rope_attention_factor(cfg))
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if family.parallel_key:
        writer.add_parallel_residual(cfg.parallel_residual)
    if family.sliding and cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([cfg.slides(layer) for layer in range(cfg.n_layer)])
    if cfg.attn_softcap is not None:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.logit_softcap is not None:
        writer.add_final_logit_softcapping(cfg.logit_softcap)


# Added tokens llama.cpp's converter writes as control tokens though not marked special
# (DeepSeek-Coder's <pad>, Gemma's <mask>, ...): does_token_look_special's names and shapes.
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
LOOKS_SPECIAL_SHAPES = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))


def looks_special(text: str) -> bool:
    """Whether llama.cpp's converter takes an added token for a control token by its text."""
    shaped = any(text.startswith(start) and text.endswith(end)
                 for start, end in LOOKS_SPECIAL_SHAPES)
    return text in LOOKS_SPECIAL or shaped


def _token_table(tok, vocab_size: int, byte_tokens: bool
                 ) -> tuple[list[str], list[gguf.TokenType]]:
    """Tokens in id order (ids the tokenizer lacks as unused padding entries) and their types,
    an added token that is special or looks it (``looks_special``) a control token, a
    user-defined one's \u2581 as a space (as llama.cpp's converter writes them);
    ``byte_tokens``: <0xNN> tokens are byte fallback's."""
    model = tok.spec["model"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i] = token
        is_byte = byte_tokens and BYTE_TOKEN.fullmatch(token)
        types[i] = gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL
    for added in tok.spec.get("added_tokens") or []:
        i = tok.token_to_id(added["content"])
        if added.get("special") or looks_special(added["content"]):
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL
        else:  # llama.cpp writes a user-defined token's text as it is: its spaces as spaces
            tokens[i] = added["content"].replace(SPIECE_SPACE, " ")
            types[i] = gguf.TokenType.USER_DEFINED
    if model.get("unk_token") is not None:
        types[tok.token_to_id(model["unk_token"])] = gguf.TokenType.UNKNOWN
    return tokens, types


def _merge_scores(spec: dict, vocab_size: int) -> list[float]:
    """Scores for llama.cpp's SPM tokenizer, which merges first the adjacent pair whose joined
    text is the highest-scoring token: minus the rank of the first merge making a token, so that
    pairs merge in the tokenizer.json's order, and below every merge for tokens none makes."""
    vocab = spec["model"]["vocab"]
    merges = spec["model"].get("merges", [])
    scores = [-float(len(merges))] * vocab_size
    for rank in reversed(range(len(merges))):
        left, right = _pair(merges[rank])
        scores[vocab[left + right]] = -float(rank)
    return scores


def _pair(merge: str | list[str]) -> tuple[str, str]:
    """A tokenizer.json merge's two pieces ("a b", as older files write it, or ["a", "b"])."""
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def unmade_tokens(spec: dict) -> list[str]:
    """A SentencePiece-style tokenizer.json's tokens of two characters or more that no merge
    makes (nor byte fallback, nor an added token): HF never gives them, while llama.cpp's SPM
    tokenizer joins any two pieces whose text is a token."""
    made = {"".join(_pair(merge)) for merge in spec["model"].get("merges", [])}
    added = {added["content"] for added in spec.get("added_tokens") or []}
    unmade = []
    for token in spec["model"]["vocab"]:
        if len(token) < 2 or token in made or token in added or BYTE_TOKEN.fullmatch(token):
            continue
        unmade.append(token)
    return unmade


def _start_token(tok, prompt_start: Sequence[int]) -> tuple[int | None, bool]:
    """(the BOS id to write, whether llama.cpp adds it) for prompts that open with
    ``prompt_start``, as the model saw text in training: llama.cpp adds one start token, so a
    longer start keeps its last (with a warning)."""
    if not prompt_start:
        return tok.bos_id, False
    if len(prompt_start) > 1:
        shown = ", ".join(repr(tok.decode([i])) for i in prompt_start)
        print(f"gguf: warning: the model's prompts open with {len(prompt_start)} tokens "
              f"({shown}); llama.cpp adds one start token: the last", file=sys.stderr)
    return prompt_start[-1], True


def _vocabulary(writer, tok, vocab_size: int, prompt_start: Sequence[int]) -> None:
    """The tokenizer in llama.cpp's terms: tokens, types, then merges and the pre-tokenizer
    (byte-level BPE) or scores and the space prefix (SentencePiece-style), and the special and
    FIM ids."""
    kind = _tokenizer_kind(tok)
    tokens, types = _token_table(tok, vocab_size, byte_tokens=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        merges = tok.spec["model"].get("merges", [])
        writer.add_tokenizer_pre(_pre_tokenizer(tok))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        writer.add_tokenizer_pre("default")
        unmade = unmade_tokens(tok.spec)
        if unmade:
            print(f"gguf: warning: no merge makes {len(unmade)} of the tokenizer's tokens (such "
                  f"as {', '.join(map(repr, unmade[:3]))}); llama.cpp joins any two pieces whose "
                  "text is a token, so its ids may differ from HF's on text holding them",
                  file=sys.stderr)
        writer.add_token_scores(_merge_scores(tok.spec, vocab_size))
        writer.add_add_space_prefix(_space_prefix(tok.spec))
    unk = tok.spec["model"].get("unk_token")
    bos_id, add_bos = _start_token(tok, prompt_start)
    for key, value in ((gguf.Keys.Tokenizer.BOS_ID, bos_id),
                       (gguf.Keys.Tokenizer.EOS_ID, tok.eos_id),
                       (gguf.Keys.Tokenizer.UNK_ID, None if unk is None else tok.token_to_id(unk)),
                       (gguf.Keys.Tokenizer.PAD_ID, tok.pad_id),
                       (gguf.Keys.Tokenizer.FIM_PRE_ID, tok.fim_prefix_id),
                       (gguf.Keys.Tokenizer.FIM_SUF_ID, tok.fim_suffix_id),
                       (gguf.Keys.Tokenizer.FIM_MID_ID, tok.fim_middle_id)):
        if value is not None:
            writer.add_uint32(key, value)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if getattr(tok, "chat_template", None) is not None:  # llama.cpp and Ollama chat with it
        source = Path(tok.source)  # the tokenizer.json read: its directory lists tool_use's too
        named = named_chat_templates(source.parent) if source.is_file() else None
        writer.add_chat_template(named or tok.chat_template)


def _permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from HF's half-split rotary layout to llama.cpp's interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, in its layouts, fp32 on the CPU."""
    cfg = model.cfg
    family = GGUF_FAMILIES[cfg.family]
    names = gguf.get_tensor_name_map(_arch_enum(family.arch), cfg.n_layer)
    tensors = {}
    for hf_name, tensor in pretrained.hf_tensors(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name}: no tensor of llama.cpp's {family.arch} takes it")
        tensor = tensor.float().cpu()
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permuted(tensor, cfg.n_head)
        if family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permuted(tensor, cfg.n_kv_head)
        if name.endswith("norm.weight") and cfg.norm_offset:  # llama.cpp scales by the weight
            tensor = tensor + cfg.norm_offset
        tensors[name] = tensor
    if cfg.tie_embeddings and family.head_required:  # the embedding, written again as the head
        tensors["output.weight"] = tensors["token_embd.weight"]
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":  # per-frequency divisors
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        tensors["rope_freqs.weight"] = plain / rope_inv_freq(cfg)
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":  # its two sets of divisors
        for kind in ("long", "short"):
            tensors[f"rope_factors_{kind}.weight"] = torch.tensor(
                cfg.rope_scaling[f"{kind}_factor"], dtype=torch.float32)
    return tensors


def _arch_enum(arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


# Matrices llama.cpp's converter keeps f32 whatever the outtype.
KEPT_F32 = ("position_embd.weight",)


def _encoded(name: str, tensor: torch.Tensor, outtype: str):
    """(data, raw dtype or None) of one tensor: vectors and KEPT_F32 stay f32, as llama.cpp's
    converter keeps them; a matrix whose rows do not fill q8_0's blocks of 32 is written f16;
    one holding a value past f16's range (q8_0's: its f16 block scales') is written f32."""
    data = tensor.numpy()
    if data.ndim < 2 or outtype == "f32" or name in KEPT_F32:
        return data.astype(np.float32), None
    if outtype in ("f16", "q8_0") and _past_f16(name, data, outtype):
        return data.astype(np.float32), None
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, kind), kind


def _past_f16(name: str, data: np.ndarray, outtype: str) -> bool:
    """Whether matrix ``data`` holds a value that ``outtype`` would write as inf (f16's largest
    is 65504; a q8_0 block's scale, its largest value / 127, is an f16), saying so on stderr."""
    blocks = outtype == "q8_0" and data.shape[-1] % 32 == 0
    limit = float(np.finfo(np.float16).max) * (127 if blocks else 1)
    if not np.any(np.abs(data) > limit):
        return False
    print(f"gguf: warning: {name} holds {float(np.nanmax(np.abs(data))):g}, past what "
          f"{outtype} holds (it would be inf): written f32", file=sys.stderr)
    return True


def _general_name(name: str, tok) -> str:
    """``name``, unless llama.cpp would take the model for Phi-3 by it: for a name holding
    "phi3" or "phi-3" llama.cpp looks up Phi-3's </s>, <unk>, <s> and <|endoftext|>, and fails
    to load a vocabulary without them (Phi-4-mini's), so such a name is written as "phi"."""
    phi3_tokens = ("</s>", "<unk>", "<s>", "<|endoftext|>")
    if all(tok.token_to_id(token) is not None for token in phi3_tokens):
        return name
    return re.sub(r"phi-?3", "phi", name, flags=re.IGNORECASE)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model: Transformer, tok: BPETokenizer, out: Path, outtype: str = "f16",
               name: str = "codelm", prompt_start: Sequence[int] | None = None,
               progress: bool = True) -> Path:
    """Write ``model`` (LoRA merged in) and ``tok`` to ``out`` as GGUF; return ``out``.
    ``prompt_start``: the ids before a prompt as the model trained (a run's
    ``LoadedModel.prompt_start``; None: the tokenizer's template start), which llama.cpp adds;
    ``progress``: the tensors' bar on a terminal."""
    check_exportable(model, tok)
    start = tok.template_prefix if prompt_start is None else prompt_start
    writer = gguf.GGUFWriter(str(out), GGUF_FAMILIES[model.cfg.family].arch)
    try:
        _write(writer, model, tok, outtype, name, start, progress and sys.stderr.isatty())
    finally:  # a failed write's file is closed before it is removed
        writer.close()
    return out


def _write(writer, model: Transformer, tok, outtype: str, name: str,
           prompt_start: Sequence[int], progress: bool) -> None:
    """The metadata, the vocabulary and the tensors, through ``writer`` into its file."""
    family = GGUF_FAMILIES[model.cfg.family]
    writer.add_name(_general_name(name, tok))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _metadata(writer, model.cfg, family)
    _vocabulary(writer, tok, model.cfg.vocab_size, prompt_start)
    with lora.merged(model):
        for tensor_name, tensor in gguf_tensors(model).items():
            data, kind = _encoded(tensor_name, tensor, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)


def fills_in_middle(task: str, init_from: str | None, data_options: dict) -> bool:
    """Whether a run's model may fill in the middle: one trained from scratch learned it under
    the fim task alone, unless its ``data_options`` set fim_rate 0 (no FIM example); the
    checkpoint a run started from (``init_from``) may hold it."""
    if init_from is not None:
        return True
    return task == "fim" and data_options.get("fim_rate") != 0


def modelfile(gguf_file: Path, tok: BPETokenizer, fill_in_middle: bool = True) -> str:
    """An Ollama Modelfile for the export: completion of the raw prompt, fill-in-the-middle in
    the tokenizer's FIM tokens when Ollama passes a suffix (``fill_in_middle``: a model that
    learned it, ``fills_in_middle``), the end-of-text token as a stop; a tokenizer with a chat
    template names no TEMPLATE, so that Ollama takes the GGUF's."""
    lines = [f"FROM {_from_path(gguf_file)}"]
    fim = (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id)
    if getattr(tok, "chat_template", None) is None:
        lines.append(_completion_template(tok, fim if fill_in_middle else (None, None, None)))
    stops = [i for i in (tok.eos_id, *fim) if i is not None]
    lines += [f'PARAMETER stop "{tok.decode([i])}"' for i in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def _completion_template(tok, fim: tuple[int | None, ...]) -> str:
    """The TEMPLATE line of a completion model: the raw prompt, or fill-in-the-middle in the
    tokenizer's FIM tokens when Ollama passes a suffix."""
    if None in fim:
        return 'TEMPLATE """{{ .Prompt }}"""'
    prefix, suffix, middle = (tok.decode([i]) for i in fim)
    return (f'TEMPLATE """{{{{- if .Suffix }}}}{prefix}{{{{ .Prompt }}}}{suffix}'
            f'{{{{ .Suffix }}}}{middle}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"""')


MODELFILE = "Modelfile"  # beside the .gguf: ollama create NAME -f Modelfile
FROM_LINE = re.compile(r'^\s*FROM\s+(?:"([^"]*)"|(\S+))', re.IGNORECASE | re.MULTILINE)


def _from_path(gguf_file: Path) -> str:
    """The FROM line's path of ``gguf_file``, relative to the Modelfile; quoted where it holds
    a space."""
    path = f"./{gguf_file.name}"
    return f'"{path}"' if any(c.isspace() for c in path) else path


def modelfile_path(out: Path) -> Path:
    """Where ``out``'s Modelfile goes: ``Modelfile`` beside it, unless a Modelfile there runs
    another file (another export's, or one the user wrote): that one is kept, and ``out``'s is
    named after ``out``, ``NAME.Modelfile`` beside ``NAME.gguf``."""
    shared = out.with_name(MODELFILE)
    if not os.path.lexists(shared) or _runs(shared, out):
        return shared
    return out.with_name(f"{out.stem}.{MODELFILE}")


def _runs(recipe: Path, out: Path) -> bool:
    """Whether Modelfile ``recipe`` names ``out`` in its FROM line (unreadable: no)."""
    try:
        found = FROM_LINE.search(recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False
    if found is None:
        return False
    named = found[1] if found[1] is not None else found[2]  # quoted, or not
    return (recipe.parent / named).resolve() == out.resolve()


def save(model: Transformer, tok: BPETokenizer, out: Path, outtype: str, name: str = "codelm",
         prompt_start: Sequence[int] | None = None, progress: bool = True,
         fill_in_middle: bool = True) -> Path:
    """Write ``model`` (LoRA merged in) and ``tok`` to ``out`` and its Modelfile
    (``modelfile_path``) beside it, together through ``process.write_atomic_files``: a failed or
    stopped write leaves neither, nor a temporary file; return ``out``. ``prompt_start`` and
    ``progress``: as ``write_gguf``'s; ``fill_in_middle``: as ``modelfile``'s."""
    out = Path(out)
    gguf_file = process.WrittenAt(partial(write_gguf, model, tok, outtype=outtype, name=name,
                                          prompt_start=prompt_start, progress=progress))
    try:
        recipe = modelfile(out, tok, fill_in_middle)
        process.write_atomic_files({out: gguf_file, modelfile_path(out): recipe})
    except OSError as e:
        raise ValueError(f"{e.filename or out}: cannot write ({e.strerror or e})") from None
    return out


def ollama_hint(out: Path, outtype: str, merged_into: str | None = None) -> str:
    """What a written export is (``merged_into``: the base a LoRA adapter was merged into) and
    how Ollama takes it in."""
    recipe = modelfile_path(out)
    kept = ""
    if recipe.name != MODELFILE:
        kept = f" ({out.with_name(MODELFILE)} runs another file: left as it is)"
    made = "" if merged_into is None else f", the adapter merged into {merged_into}"
    return (f"wrote {out} ({outtype}{made}) and {recipe}{kept}: ollama create NAME -f "
            f"{shlex.quote(str(recipe))}")
