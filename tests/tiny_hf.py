"""Tiny random Hugging Face checkpoints of the families (FAMILIES, the first four; MODERN,
the others and their variants: a new family's configs go there), and tokenizer.json files in the
shape the real models ship, built at test time (no download).

Each keeps its family's real config fields and layer naming at toy sizes. Shared by the model,
LoRA, recipe, tokenizer and dataset tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

# The Split regex of Meta's Llama-3 tokenizer.json (meta-llama/Meta-Llama-3-8B,
# pre_tokenizer.pretokenizers[0].pattern.Regex, JSON escapes undone), written out here rather
# than imported from tokenizer.py so that the llama3 reference is independent of codelm's own.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

FAMILIES = ("gpt_bigcode", "codegen", "phi", "llama")
# Today's families, and Llama with the other rope scalings; each named config keeps its real
# models' traits (the window shorter than the tests' inputs).
MODERN = ("qwen2", "qwen2-window", "qwen3", "mistral", "starcoder2", "phi3", "gemma", "gemma2",
          "llama-linear", "llama-dynamic", "llama-yarn", "stablelm", "stablelm-parallel")
WINDOW = 48  # the sliding window of the tiny configs that slide


def tiny_hf_config(family: str, **overrides):
    """A small config of the family's real class, with the traits that make the family tricky."""
    import transformers as tf

    if family == "gpt_bigcode":  # StarCoderBase: multi-query attention, learned positions
        kw = dict(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                  multi_query=True, activation_function="gelu_pytorch_tanh")
        cls = tf.GPTBigCodeConfig
    elif family == "codegen":  # CodeGen: fused q-v-k qkv_proj, interleaved partial rotary
        kw = dict(vocab_size=256, n_positions=128, n_ctx=128, n_embd=64, n_layer=2, n_head=4,
                  rotary_dim=8, activation_function="gelu_new")
        cls = tf.CodeGenConfig
    elif family == "phi":  # Phi-1.5: parallel residual, partial rotary, lm_head bias
        kw = dict(vocab_size=256, max_position_embeddings=128, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  partial_rotary_factor=0.5, hidden_act="gelu_new")
        cls = tf.PhiConfig
    elif family == "llama":  # Llama-3.2: grouped-query attention, llama3 rope scaling, tied
        kw = dict(vocab_size=256, max_position_embeddings=128, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=500000.0)
        cls = tf.LlamaConfig
    elif family in MODERN:
        cls, kw = _modern_config(family)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + MODERN}")
    # Special ids inside the toy vocabulary (the classes default to GPT-2's 50256).
    return cls(**{"bos_token_id": 1, "eos_token_id": 2, **kw, **overrides})


def _modern_config(name: str):
    """(config class, keywords) of one of MODERN: 256 positions, width 64, grouped queries."""
    import transformers as tf

    shape = dict(vocab_size=256, max_position_embeddings=256, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    if name == "qwen2":  # Qwen2.5-Coder: q/k/v bias, rope_theta 1e6, tied, no window
        return tf.Qwen2Config, dict(shape, tie_word_embeddings=True, rope_theta=1e6)
    if name == "qwen2-window":  # Qwen2's sliding layers from max_window_layers on
        return tf.Qwen2Config, dict(shape, num_hidden_layers=3, use_sliding_window=True,
                                    sliding_window=WINDOW, max_window_layers=1)
    if name == "qwen3":  # Qwen3: q/k RMSNorm, head_dim 32 (not width / heads), tied
        return tf.Qwen3Config, dict(shape, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)
    if name == "mistral":  # Mistral: a sliding window on every layer
        return tf.MistralConfig, dict(shape, sliding_window=WINDOW)
    if name == "starcoder2":  # StarCoder2: LayerNorm, biases everywhere, GELU-tanh MLP, window
        return tf.Starcoder2Config, dict(shape, sliding_window=WINDOW, use_bias=True,
                                         hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    if name == "phi3":  # Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary, LongRoPE
        # (its long factors past 64 positions, a quarter of the context); a window
        longrope = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
        return tf.Phi3Config, dict(shape, partial_rotary_factor=0.75, sliding_window=WINDOW,
                                   pad_token_id=0, rope_scaling=longrope,
                                   original_max_position_embeddings=64)
    if name == "gemma":  # CodeGemma 2B: multi-query attention, head_dim 32, tied
        return tf.GemmaConfig, dict(shape, num_key_value_heads=1, head_dim=32, pad_token_id=0)
    if name == "gemma2":  # Gemma 2: every other layer slides, soft caps, head_dim 32; caps
        # low enough to bend a tiny model's scores (real: 50 and 30)
        return tf.Gemma2Config, dict(shape, num_hidden_layers=3, head_dim=32,
                                     query_pre_attn_scalar=24, sliding_window=WINDOW,
                                     attn_logit_softcapping=0.5, final_logit_softcapping=0.2,
                                     pad_token_id=0)
    if name == "stablelm":  # StableLM-2-1.6B: LayerNorm, partial rotary (a quarter), qkv bias
        return tf.StableLmConfig, dict(shape, use_qkv_bias=True, partial_rotary_factor=0.25)
    if name == "stablelm-parallel":  # StableLM-3B-like: parallel residual, one shared norm
        return tf.StableLmConfig, dict(shape, use_parallel_residual=True,
                                       partial_rotary_factor=0.25)
    scaling = {"llama-linear": {"rope_type": "linear", "factor": 4.0},  # DeepSeek-Coder's
               "llama-dynamic": {"rope_type": "dynamic", "factor": 2.0},
               "llama-yarn": {"rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 64}}[name]
    return tf.LlamaConfig, dict(shape, rope_scaling=scaling)


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    # Random, non-trivial weights everywhere (HF zero-inits biases; make them count).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny_hf(family: str, path: Path, seed: int = 0, **overrides):
    """Build a tiny model and ``save_pretrained`` it (safetensors) to ``path``; return the model."""
    model = tiny_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    return model


def tiny_checkpoints(names, tmp_path_factory) -> dict:
    """name -> (HF directory, transformers model, codelm model loaded from the directory)."""
    from codelm.models import pretrained

    out = {}
    for name in names:
        path = tmp_path_factory.mktemp(name)
        hf = save_tiny_hf(name, path)
        out[name] = (path, hf, pretrained.load(path))
    return out


STARCODER_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def trained_bpe(pre, texts: list[str], specials=("<|endoftext|>",), vocab_size: int = 600,
                min_frequency: int = 0, alphabet: bool = True, model=None) -> Tokenizer:
    """A byte-level BPE tokenizer (``model``, else a plain BPE; ``pre`` its pre-tokenizer)
    trained on ``texts`` by HF's own BpeTrainer: every byte in its alphabet unless
    ``alphabet`` is False."""
    tok = Tokenizer(models.BPE() if model is None else model)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_hf_tokenizer(style: str, texts: list[str], path) -> Tokenizer:
    """A tokenizer.json in the shape the real models ship, trained by HF's own BpeTrainer."""
    if style == "qwen2":
        return train_family_tokenizer(style, texts, path)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
    if style == "gpt2":  # CodeGen / Phi-1.5
        model = models.BPE()
        pre = byte_level
        specials = ["<|endoftext|>"]
    elif style == "starcoder":
        model = models.BPE()
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        specials = STARCODER_SPECIALS
    else:  # Llama-3
        model = models.BPE(ignore_merges=True)
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        pre = pre_tokenizers.Sequence([split, byte_level])
        specials = LLAMA3_SPECIALS
    tok = trained_bpe(pre, texts, specials, vocab_size=3000, model=model)
    if style == "gpt2":
        # CodeGen ships runs of spaces and tabs as added (normalized, non-special) tokens.
        tok.add_tokens([AddedToken(" " * n, normalized=True) for n in range(2, 9)])
        tok.add_tokens([AddedToken("\t" * n, normalized=False) for n in range(2, 5)])
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    elif style == "starcoder":
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
        )
    else:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
                ),
            ]
        )
    tok.save(str(path))
    return tok


# Qwen2's Split regex (Qwen/Qwen2.5-Coder-1.5B tokenizer.json, pre_tokenizer.pretokenizers[0]):
# Llama-3's with single digits.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                  "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                  "<|file_sep|>"]
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
# The tokenizer.json types of today's families: Qwen2/2.5/3 (NFC, a Split regex, byte-level
# BPE), SentencePiece BPE with byte fallback as Llama-2, CodeLlama, Mistral v0.1 and Phi-3 ship
# it (Prepend and Replace to U+2581, no pre-tokenizer), and the Metaspace form of the same. The
# vocabularies: "spm" as SentencePiece trains one (each token one run of letters, digits or
# other characters, after its spaces), its merges of ▁ runs last as in Llama-2's file,
# "spm-words" with punctuation glued to words (each token after its spaces), "metaspace" with
# tokens across spaces; "gemma" as transformers writes Gemma's and CodeGemma's (Replace alone, a
# Split after spaces, no Strip); "gemma3" as Gemma 3's file: that, its merges of ▁ runs first, a
# few merges across runs of letters, digits and other characters (as its "²," and ">▁</"), and
# its added tokens (runs of newlines and of ▁ matched as written, HTML tags, unused ones).
FAMILY_TOKENIZER_STYLES = ("qwen2", "spm", "spm-words", "metaspace", "gemma", "gemma3")
SPIECE_RUNS = r"▁*[\p{L}\p{M}]+|▁*\p{N}|▁*[^\p{L}\p{M}\p{N}▁]+|▁+"


def train_family_tokenizer(style: str, texts: list[str], path) -> Tokenizer:
    """A tokenizer.json of one of FAMILY_TOKENIZER_STYLES, trained by HF's own BpeTrainer; the
    SentencePiece ones with a small alphabet, so that byte fallback (<0xNN>) is exercised, and
    the Metaspace one on pieces of 16 lines, so that its tokens glue spaces and newlines inside
    them (whole files as its words train as much, 15x slower)."""
    from tokenizers import normalizers

    if style == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=QWEN2_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.save(str(path))
        return tok
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if style in ("spm", "spm-words"):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
        # Trained on the style's pieces; the file has no pre-tokenizer, as Llama-2's.
        pieces = SPIECE_RUNS if style == "spm" else "\u2581*[^\u2581]+|\u2581+"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    elif style in ("gemma", "gemma3"):
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPIECE_RUNS), behavior="isolated")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581",
                                                            prepend_scheme="first", split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPM_SPECIALS,
                                  limit_alphabet=120, show_progress=False)
    if style == "metaspace":
        texts = _pieces_of_lines(texts, 16)
    tok.train_from_iterator(texts, trainer)
    # The 256 byte tokens join the vocabulary (not added tokens), as in Llama-2's file.
    spec = json.loads(tok.to_str())
    if style in ("gemma", "gemma3"):  # transformers' GemmaConverter writes this pre-tokenizer
        spec["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "},
                                 "behavior": "MergedWithPrevious", "invert": False}
    elif style != "metaspace":
        spec["pre_tokenizer"] = None
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    if style == "spm":
        _runs_of_spaces_merge(spec["model"], first=False)
    elif style == "gemma3":
        _runs_of_spaces_merge(spec["model"], first=True)
        vocab = spec["model"]["vocab"]  # renumbered
        for pair in GEMMA3_CROSSING_MERGES:
            vocab.setdefault("".join(pair), len(vocab))
        runs = sum(set("".join(m)) == {"\u2581"} for m in spec["model"]["merges"])
        spec["model"]["merges"][runs:runs] = [list(pair) for pair in GEMMA3_CROSSING_MERGES]
    tok = Tokenizer.from_str(json.dumps(spec))
    if style == "gemma3":
        tok.add_special_tokens([AddedToken(t, normalized=False)
                                for t in ("<start_of_turn>", "<end_of_turn>")])
        tok.add_tokens([AddedToken(t, normalized=False) for t in GEMMA3_ADDED])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return tok


def _pieces_of_lines(texts: list[str], lines: int) -> list[str]:
    """Each text cut into pieces of ``lines`` lines, their line ends kept."""
    pieces = []
    for text in texts:
        split = text.splitlines(keepends=True)
        for start in range(0, len(split), lines):
            pieces.append("".join(split[start : start + lines]))
    return pieces


# Merges right after those of ▁ runs in the "gemma3" style, each across a cut between runs of letters, digits and other
# characters (the last glues a ▁ after another character), and its added tokens.
GEMMA3_CROSSING_MERGES = [("1", ")"), ("f", "("), (")", "\u2581"), ("e", ".")]
GEMMA3_ADDED = ["\n" * n for n in range(1, 32)] + ["\u2581" * n for n in range(2, 32)] + [
    "<table>", "<tr>", "</td>", "[multimodal]", *(f"<unused{n}>" for n in range(100))]


def _runs_of_spaces_merge(model: dict, first: bool) -> None:
    """Move the merges that make runs of ▁ first (Gemma 3's file) or last (Llama-2's), and drop
    those that make ▁▁ before another character with the tokens they make (neither file has
    such a token; SentencePiece, and llama.cpp after it, would join any two pieces whose text
    is a token), the rest renumbered in their order."""
    crossing = re.compile("\u2581\u2581[^\u2581]")
    merges = [m for m in model["merges"] if not crossing.search("".join(m))]
    kept = [t for t in sorted(model["vocab"], key=model["vocab"].get) if not crossing.search(t)]
    model["vocab"] = {token: i for i, token in enumerate(kept)}
    runs = [m for m in merges if set("".join(m)) == {"\u2581"}]
    rest = [m for m in merges if set("".join(m)) != {"\u2581"}]
    model["merges"] = runs + rest if first else rest + runs


LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                        "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")


def save_tiny_llama3_instruct(path: Path, texts: list[str], seed: int = 0, **overrides):
    """A Llama-3.2-1B-Instruct-shaped checkpoint in ``path``: tokenizer_config.json as the Hub's
    (bos <|begin_of_text|>, eos <|eot_id|>, a chat_template, model_max_length 131072), config.json
    and generation_config.json with eos_token_id [<|end_of_text|>, <|eot_id|>] (the real list adds
    <|eom_id|>) and the sampling defaults; ``overrides``: config fields; return (model, HF
    tokenizer, that eos list)."""
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_hf_tokenizer("llama3", texts, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 131072,
         "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": True,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    bos = tok.token_to_id("<|begin_of_text|>")
    eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    model = save_tiny_hf("llama", path, seed=seed, vocab_size=tok.get_vocab_size(),
                         bos_token_id=bos, eos_token_id=eos, **overrides)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(path)
    return model, tok, eos


def save_tiny_adapter(root: Path, alpha: float = 4) -> tuple[Path, Path]:
    """A tiny codelm model saved in HF's layout as ``root``/base and a LoRA adapter of rank 2
    and ``alpha`` on it as ``root``/adapter (naming that base): an --init-adapter to start from."""
    import dataclasses

    import lora
    from architecture import PRESETS, Transformer
    from codelm.models import adapter_config, pretrained
    from tokenizer import CodeTokenizer

    tok = CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size,
                                            bos_id=tok.bos_id, eos_id=tok.eos_id))
    base, adapter = Path(root) / "base", Path(root) / "adapter"
    pretrained.save(model, base)
    lora.apply_lora(model, adapter_config.LoRAConfig(r=2, alpha=alpha))
    lora.save_adapter(model, adapter, base_model_name_or_path=str(base))
    return base, adapter


def save_random_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter (rank 4 on q_proj and v_proj) of the HF checkpoint ``base``, its B drawn
    at random so that it changes the logits, saved to ``out`` naming ``base``."""
    import lora
    from codelm.models import adapter_config, pretrained

    model = pretrained.load(base)
    lora.apply_lora(model, adapter_config.LoRAConfig(r=4, alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    return lora.save_adapter(model, out, base_model_name_or_path=str(base))


def hub_cache(cache: Path, repo_id: str, files: Path, revision: str = "main",
              repo_type: str = "model") -> str:
    """Put the files of ``files`` into a Hugging Face hub cache (``HF_HUB_CACHE``) as the hub
    client leaves a download: content-addressed blobs, a snapshot of relative links per commit,
    ``refs/<revision>`` naming the commit. Returns the commit hash."""
    import hashlib
    import os

    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in files.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
