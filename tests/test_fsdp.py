"""--strategy fsdp (FSDP2 under torchrun, gloo on the CPU): the same losses as one process at the
same global batch, a sharded checkpoint that resumes bit-exactly after kill -9 and loads into one
process, LoRA on a sharded base exported as an adapter PEFT reads, two "nodes" through c10d."""

from __future__ import annotations

import copy
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_trainingmanager
import torch
from safetensors.torch import load_file
from test_trainingmanager import (
    ENV,
    KILLER,
    ROOT,
    assert_bit_equal,
    final_weights,
    tiny_cfg,
    tiny_llama,
    write_config,
)

import trainingmanager as tm
from codelm import trainconfig
from codelm.runs import checkpoint, rundir
from codelm.runtime import distributed
from codelm.training import plan

assets = test_trainingmanager.assets  # the fixtures: a small corpus and its tokenizer,
pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons between processes
CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU
# adam_eps 1e-6: with 1e-8, Adam turns gradients of ~1e-8 into lr-sized updates, so the rounding
# of two correct reduction orders would show in the weights.
COMMON = dict(grad_accum=2, adam_eps=1e-6, device="cpu")


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun`` of ``nproc`` CPU processes on this machine, its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=ROOT, env=CPU_ENV,
                          capture_output=True, text=True, timeout=600)


def _train_on_two_ranks(cfg: trainconfig.TrainConfig, tmp_path: Path) -> Path:
    """Run ``cfg`` (per-rank batch) on two FSDP ranks; its run directory."""
    proc = _torchrun("trainingmanager.py", "--config",
                     str(write_config(cfg, tmp_path / f"{cfg.name}.json")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes (fsdp)" in proc.stdout
    return Path(cfg.out_dir) / cfg.name


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / rundir.METRICS_FILE).read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if m["kind"] == "train"]


def _val_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / rundir.METRICS_FILE).read_text().splitlines()
    return [m["val_loss"] for m in map(json.loads, lines) if m["kind"] == "val"]


def _token_counts(run_dir: Path) -> list[tuple[str, int]]:
    """Each train line's tokens_seen and each validation line's val_tokens, in order."""
    lines = (run_dir / rundir.METRICS_FILE).read_text().splitlines()
    keys = {"train": "tokens_seen", "val": "val_tokens"}
    return [(m["kind"], m[keys[m["kind"]]]) for m in map(json.loads, lines) if m["kind"] in keys]


def _sharded(path: Path) -> dict:
    """A sharded checkpoint's model and optimizer tensors, whole (DCP's own reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path / checkpoint.SHARDED_DIR, whole)
    return torch.load(whole, weights_only=False)


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def test_fsdp_two_ranks_train_like_one_process_and_the_sharded_checkpoint_goes_on_in_one(
        assets, tmp_path):
    """Two FSDP ranks of batch 2 against one process of batch 4: the same losses step by step
    (the validation's 3 batches dealt 2 and 1: the ranks still meet in every collective), the
    same tokens counted (the ranks' counts summed, not averaged), and
    the sharded checkpoint of step 6 (each rank wrote its shards) continued by one process,
    regrouped to batch 4, ends on the weights the one-process run reaches."""
    common = dict(max_steps=6, eval_every=6, save_every=6, eval_examples=6, **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    cfg = tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2, strategy="fsdp", **common)
    run = _train_on_two_ranks(cfg, tmp_path)
    step_6 = run / rundir.CHECKPOINTS_DIR / "step-6"
    assert sorted(p.name for p in (step_6 / checkpoint.SHARDED_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step_6 / rundir.MODEL_FILE).exists()
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-5)
    assert _val_losses(run) == pytest.approx(_val_losses(single.run_dir), rel=1e-5)
    assert _token_counts(run) == _token_counts(single.run_dir)
    # best/ holds the whole model, gathered to rank 0
    best, reference = load_file(run / rundir.BEST_DIR / rundir.MODEL_FILE), final_weights(
        single.run_dir, 6)
    assert best.keys() == reference.keys()
    for k in best:
        assert torch.allclose(best[k], reference[k], atol=1e-6, rtol=0), k

    with pytest.raises(ValueError, match=r"global batch of 8 .* this run's is 4"):
        tm.train(dataclasses.replace(cfg, resume=str(run), strategy="ddp", max_steps=9))
    whole = _torchrun("trainingmanager.py", "--resume", str(single.run_dir), "--strategy",
                      "fsdp", "--max-steps", "9")  # one process's checkpoint
    assert whole.returncode != 0
    said = whole.stdout + whole.stderr
    assert all(w in said for w in ("step-6 is a whole checkpoint",
                                   "continue it with --strategy ddp")), said[:1500]
    tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4,
                      **{**common, "max_steps": 9}, resume=str(single.run_dir)))
    tm.train(dataclasses.replace(cfg, resume=str(run), strategy="ddp", batch_size=4,
                                 max_steps=9))
    a, b = final_weights(single.run_dir, 9), final_weights(run, 9)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


@pytest.mark.slow
def test_fsdp_losses_equal_one_process_for_50_steps(assets, tmp_path):
    """50 steps: two FSDP ranks of batch 2 and one process of batch 4 log the same losses to
    within fp32's reduction-order rounding."""
    common = dict(max_steps=50, eval_every=25, save_every=25, **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    run = _train_on_two_ranks(tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2,
                                       strategy="fsdp", **common), tmp_path)
    ours, reference = _losses(run), _losses(single.run_dir)
    assert len(ours) == 50 and reference[-1] < reference[0] - 1.0
    assert ours == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_fsdp_resume_after_kill_9_is_bit_exact(assets, tmp_path):
    """Both ranks killed at the start of step 7: the resume from the sharded step-4 checkpoint
    (dropout on: each rank's RNG comes back) ends with the model and optimizer shards of the
    run never killed, bit for bit."""
    common = dict(max_steps=10, dropout=0.1, batch_size=2, strategy="fsdp", **COMMON)
    straight = _train_on_two_ranks(tiny_cfg(assets, tmp_path, name="straight", **common),
                                   tmp_path)
    cfg = tiny_cfg(assets, tmp_path, name="killed", **common)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = _torchrun(str(killer), "step", "7", "--config",
                     str(write_config(cfg, tmp_path / "killed.json")))
    assert proc.returncode != 0 and "Signal 9" in proc.stderr, proc.stderr[-3000:]
    run = Path(cfg.out_dir) / "killed"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"]
    proc = _torchrun("trainingmanager.py", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "not bit-exact" not in proc.stdout
    a = _flat(_sharded(straight / rundir.CHECKPOINTS_DIR / "step-10"))
    b = _flat(_sharded(run / rundir.CHECKPOINTS_DIR / "step-10"))
    assert any(k.startswith("optimizer/state/") for k in a)
    assert_bit_equal(a, b)


@pytest.mark.slow
def test_lora_on_a_sharded_base_trains_as_one_process_and_exports_what_peft_loads(
        assets, tmp_path):
    """LoRA on a frozen base that FSDP shards, each block recomputed in the backward (gradient
    checkpointing gathers it again): the adapter trains as one process's does, its checkpoints
    hold only the adapter (and its optimizer state), and the exported adapter gives in PEFT the
    logits codelm gives."""
    import transformers
    from peft import PeftModel

    import lora
    from codelm.models import pretrained

    base = tiny_llama(tmp_path)
    common = dict(init_from=str(base), lora_r=4, lora_alpha=8.0,
                  lora_targets=["q_proj", "v_proj"], max_steps=6, eval_every=6, save_every=6,
                  export=True, **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    run = _train_on_two_ranks(tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2,
                                       strategy="fsdp", gradient_checkpointing=True, **common),
                              tmp_path)
    shards = _flat(_sharded(run / rundir.CHECKPOINTS_DIR / "step-6"))
    assert shards and all("lora_" in k for k in shards)
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-5)
    ours = load_file(run / rundir.EXPORT_DIR / "adapter_model.safetensors")
    reference = load_file(single.run_dir / rundir.EXPORT_DIR / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for k in ours:
        assert torch.allclose(ours[k], reference[k], atol=1e-6, rtol=0), k
    assert any("lora_B" in k and ours[k].abs().max() > 0 for k in ours)

    model = pretrained.load(base, device="cpu")
    lora.load_adapter(model, run / rundir.EXPORT_DIR)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), run / rundir.EXPORT_DIR).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codelm_logits = model.eval()(ids)
        torch.testing.assert_close(codelm_logits, peft_model(ids).logits, atol=1e-4, rtol=0)
        assert (codelm_logits - hf(ids).logits).abs().max() > 1e-4  # the adapter counts


def _dequantized_base(base: Path, bits: int, out: Path) -> Path:
    """``base`` with each Linear that a QLoRA run quantizes replaced by its dequantized weights,
    saved as an HF checkpoint: the base a QLoRA adapter trained on, for PEFT."""
    from codelm.models import pretrained, quantize

    model = pretrained.load(base, device="cpu")
    quantize.quantize_base(model, bits=bits)
    for path, q in list(model.named_modules()):
        if isinstance(q, quantize.QuantLinear):
            linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            linear.weight.data = q.dequantize(torch.float32)
            if q.bias is not None:
                linear.bias.data = q.bias.data
            model.set_submodule(path, linear)
    pretrained.save(model, out)
    return out


# Under torchrun: the bytes of the quantized base's codes and scales whole and on this rank once
# sharded in bf16, and the dtypes a block's LoRA and a quantized layer see in their forward.
QUANTIZED_BYTES = r"""
import json, sys
import torch
from codelm import loading, trainconfig
from codelm.models import quantize
from codelm.runtime import distributed
from codelm.runtime.settings import fields_of

cfg = trainconfig.TrainConfig(**json.loads(open(sys.argv[1]).read()))
dist = distributed.this_process()
distributed.join(dist, torch.device("cpu"))
settings = trainconfig.ModelSettings(**fields_of(trainconfig.ModelSettings, cfg))
model = loading.build_model(settings, type("Tok", (), {"vocab_size": 8})())
whole = sum(p.nbytes for p in quantize.quantized_parameters(model))
distributed.shard(model, "bf16")
held = sum(p.to_local().nbytes for p in quantize.quantized_parameters(model))
seen = {}
qkv = model.blocks[0].attn.qkv
qkv.register_forward_pre_hook(lambda m, args: seen.update(lora=str(m.lora_A["q_proj"].dtype)))
qkv.base.register_forward_pre_hook(lambda m, args: seen.update(
    codes=str(m.qweight.dtype), scales=str(m.scale.dtype)))
model(torch.zeros(1, 8, dtype=torch.long))
with open(f"{sys.argv[2]}.{dist.rank}", "w") as f:
    json.dump({"whole": whole, "held": held, **seen}, f)
distributed.leave()
"""


@pytest.mark.slow
def test_qlora_on_a_sharded_nf4_base_trains_as_one_process_and_exports_what_peft_loads(
        assets, tmp_path):
    """QLoRA with FSDP: the NF4 base's codes and scales sharded (each rank holds half their
    bytes), each block recomputed in the backward: the losses and the adapter of one process,
    and the exported adapter gives in PEFT, on the dequantized base, the logits codelm gives."""
    import transformers
    from peft import PeftModel

    import lora
    from codelm.models import pretrained, quantize

    base = tiny_llama(tmp_path)
    common = dict(init_from=str(base), lora_r=4, lora_alpha=8.0, quantize_bits=4,
                  lora_targets=["q_proj", "v_proj", "down_proj"], max_steps=6, eval_every=6,
                  save_every=6, export=True, **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    cfg = tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2, strategy="fsdp",
                   gradient_checkpointing=True, **common)
    run = _train_on_two_ranks(cfg, tmp_path)
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-5)
    shards = _flat(_sharded(run / rundir.CHECKPOINTS_DIR / "step-6"))
    assert shards and all("lora_" in k for k in shards)
    ours = load_file(run / rundir.EXPORT_DIR / "adapter_model.safetensors")
    reference = load_file(single.run_dir / rundir.EXPORT_DIR / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for k in ours:
        assert torch.allclose(ours[k], reference[k], atol=1e-6, rtol=0), k

    script = tmp_path / "quantized_bytes.py"
    script.write_text(QUANTIZED_BYTES)
    proc = _torchrun(str(script), str(write_config(cfg, tmp_path / "bytes.json")),
                     str(tmp_path / "bytes"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"bytes.{rank}").read_text()) for rank in (0, 1)]
    whole = ranks[0]["whole"]
    assert whole > 0 and sum(r["held"] for r in ranks) == whole
    assert all(0.45 * whole <= r["held"] <= 0.55 * whole for r in ranks), ranks
    assert (ranks[0]["lora"], ranks[0]["codes"], ranks[0]["scales"]) == (
        "torch.bfloat16", "torch.uint8", "torch.float32")  # the scales gathered as stored

    model = pretrained.load(base, device="cpu")
    quantize.quantize_base(model, bits=4)
    lora.load_adapter(model, run / rundir.EXPORT_DIR)
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(
        _dequantized_base(base, 4, tmp_path / "dequantized"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(dequantized),
                                           run / rundir.EXPORT_DIR).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codelm_logits = model.eval()(ids)
        torch.testing.assert_close(codelm_logits, peft_model(ids).logits, atol=1e-4, rtol=0)
        assert (codelm_logits - dequantized(ids).logits).abs().max() > 1e-4  # the adapter counts


@pytest.mark.slow
def test_a_diverged_fsdp_run_names_its_sharded_checkpoint_which_eval_scores_as_one_process(
        assets, tmp_path):
    """A QLoRA run on two FSDP ranks whose loss turns NaN at step 6: the stop names its sharded
    step-4 checkpoint as the last good one, as one process's run names its step-4; eval.py,
    with no best/ or export/ to score, reads that checkpoint's shards in one process and scores
    it as it scores one process's step 4."""
    import eval as ev
    from codelm.evaluation.config import EvalConfig

    common = dict(init_from=str(tiny_llama(tmp_path)), lora_r=4, lora_alpha=8.0,
                  quantize_bits=4, lora_targets=["q_proj", "v_proj"], max_steps=10,
                  eval_every=100, save_every=4, inject_nan_at_step=6, **COMMON)
    single = tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common)
    assert tm.main(["--config", str(write_config(single, tmp_path / "single.json"))]) == 1
    cfg = tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2, strategy="fsdp", **common)
    proc = _torchrun("trainingmanager.py", "--config",
                     str(write_config(cfg, tmp_path / "fsdp.json")))
    assert proc.returncode != 0
    runs = {name: Path(cfg.out_dir) / name for name in ("single", "fsdp")}
    for name, run in runs.items():
        step_4 = run / rundir.CHECKPOINTS_DIR / "step-4"
        assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"], name
        assert checkpoint.is_sharded(step_4) == (name == "fsdp")
        error = json.loads((run / rundir.METRICS_FILE).read_text().splitlines()[-1])
        assert "non-finite" in error["message"], error
        assert f"last good checkpoint is {step_4}" in error["message"], error
        assert not (run / rundir.BEST_DIR).exists() and not (run / rundir.EXPORT_DIR).exists()
    scored = {}
    for name, run in runs.items():
        result = ev.evaluate(EvalConfig(models=[str(run)], tasks=["lm"], lm_windows=8,
                                           out_dir=str(tmp_path / f"eval-{name}"),
                                           device="cpu", progress=False))
        (row,) = result["rows"]
        scored[name] = row["metrics"]
        assert result["models"][0]["weights"] == "checkpoints/step-4/", result["models"]
    assert scored["fsdp"].keys() == scored["single"].keys()
    assert scored["fsdp"] == pytest.approx(scored["single"], rel=1e-4)

    # Resumed without the NaN, each continues from its step 4: the sharded adapter and its
    # AdamW moments come back on both ranks, and the two runs go on alike to step 10.
    tm.train(dataclasses.replace(single, resume=str(runs["single"]), inject_nan_at_step=None))
    resumed = dataclasses.replace(cfg, resume=str(runs["fsdp"]), inject_nan_at_step=None)
    proc = _torchrun("trainingmanager.py", "--config",
                     str(write_config(resumed, tmp_path / "resumed.json")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout
    ours, reference = _losses(runs["fsdp"]), _losses(runs["single"])
    assert len(ours) == len(reference) >= 10
    assert ours == pytest.approx(reference, rel=1e-5, nan_ok=True)


@pytest.mark.slow
def test_fsdp_in_bf16_follows_one_process_in_bf16(assets, tmp_path):
    """--precision bf16: the blocks' weights are gathered in bf16 and the gradients reduced in
    fp32 (the shards stay fp32); the losses follow one process's bf16 autocast run to within
    bf16's rounding, and the checkpoint records bf16."""
    common = dict(max_steps=6, eval_every=6, save_every=6, precision="bf16", **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    run = _train_on_two_ranks(tiny_cfg(assets, tmp_path, name="fsdp", batch_size=2,
                                       strategy="fsdp", **common), tmp_path)
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-2)
    assert checkpoint.read_state(run / rundir.CHECKPOINTS_DIR / "step-6").precision == "bf16"
    shards = _flat(_sharded(run / rundir.CHECKPOINTS_DIR / "step-6"))
    assert {t.dtype for t in shards.values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_ranks_with_uneven_validation_meet_in_kto_and_in_a_timed_runs_sizing(assets, tmp_path):
    """KTO runs two forwards a validation batch (completions, then KL rows): the FSDP rank with
    fewer batches runs as many idle ones (6 records in batches of 2: 2 and 1). A timed run sizes
    itself on rank 0's clock and timing loop, and a rank holding no validation batch (4 records,
    batch 4) times an evaluation too: both finish, every collective met."""
    names = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "item"]
    records = [{"prompt": f"def add_{i}({names[i % 8]}, b):\n    return",
                "completion": f" {names[i % 8]} {'+-'[i % 2]} b\n", "label": i % 2 == 0}
               for i in range(64)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    kto = tiny_cfg(assets, tmp_path, name="kto", task="kto", data=[str(data)], block_size=48,
                   batch_size=2, max_steps=4, eval_every=2, eval_examples=None, save_every=4,
                   strategy="fsdp", device="cpu")
    run = _train_on_two_ranks(kto, tmp_path)
    assert len(_val_losses(run)) == 2
    timed = tiny_cfg(assets, tmp_path, name="timed", strategy="ddp", max_steps=None,
                     time_budget_min=0.3, eval_examples=4, device="cpu")
    proc = _torchrun("trainingmanager.py", "--config", str(write_config(timed, tmp_path / "t.json")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time budget 0.3 min" in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_on_two_nodes_through_c10d_rendezvous_trains_like_one_process(assets, tmp_path):
    """Two launchers, one process each, meeting at 127.0.0.1 through torchrun's c10d rendezvous
    (as two machines would): the losses of one process at the same global batch."""
    common = dict(max_steps=6, eval_every=6, save_every=6, **COMMON)
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    cfg = tiny_cfg(assets, tmp_path, name="nodes", batch_size=2, strategy="fsdp", **common)
    config = write_config(cfg, tmp_path / "nodes.json")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
              "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "codelm-test",
              "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--local-addr", "127.0.0.1",
              "trainingmanager.py", "--config", str(config)]
    nodes = [subprocess.Popen(launch, cwd=ROOT, env=CPU_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sum("x 2 processes (fsdp)" in out for out, _ in outputs) == 1  # rank 0's node
    run = Path(cfg.out_dir) / "nodes"
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-5)


def test_the_last_finite_checkpoint_is_found_among_sharded_ones(tmp_path):
    """finite_checkpoint reads a sharded checkpoint's weights from its shards: the newest
    whose shards are intact and finite."""
    import torch.distributed.checkpoint as dcp

    from codelm.runtime import process

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    steps = [tmp_path / f"step-{n}" for n in (2, 4, 6)]
    for n, path in zip((2, 4, 6), steps):
        assert checkpoint.save_sharded(path, checkpoint.RunState(step=n), {}, model, optimizer,
                                       False, distributed.Dist()) is None
    assert checkpoint.finite_checkpoint(steps, trainable_only=False) == steps[2]
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    # step-6's shards hold a NaN under a manifest that matches them; step-4's shards changed
    # under its manifest.
    shards = {"model": model.state_dict()}
    dcp.save(shards, checkpoint_id=steps[2] / checkpoint.SHARDED_DIR)
    dcp.save(shards, checkpoint_id=steps[1] / checkpoint.SHARDED_DIR)
    process.write_manifest(steps[2])
    assert checkpoint.finite_checkpoint(steps, trainable_only=False) == steps[0]


def test_a_sharded_checkpoint_at_another_step_or_with_nonfinite_moments_is_not_good(
        tmp_path, monkeypatch):
    """Sharded checkpoints under manifests that match them: step-4 whose state.pt says step 6,
    step-6 whose Adam moments hold NaN (finite weights). Neither is the last good one (its
    tensors read one at a time here), and loading either is a CorruptCheckpointError naming the
    checkpoint and what is wrong."""
    import torch.distributed.checkpoint as dcp

    from codelm.runtime import process

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    step_2, step_4, step_6 = (tmp_path / f"step-{n}" for n in (2, 4, 6))
    for path, step in ((step_2, 2), (step_4, 6), (step_6, 6)):
        assert checkpoint.save_sharded(path, checkpoint.RunState(step=step), {}, model,
                                       optimizer, False, distributed.Dist()) is None
    for slots in optimizer.state.values():
        slots["exp_avg"].fill_(float("nan"))
    dcp.save(checkpoint._shards(model, optimizer, False),
             checkpoint_id=step_6 / checkpoint.SHARDED_DIR)
    process.write_manifest(step_6)
    monkeypatch.setattr(checkpoint, "SHARD_SCAN_BYTES", 1)
    assert checkpoint.finite_checkpoint([step_2, step_4, step_6], trainable_only=False) == step_2
    fresh = torch.nn.Linear(4, 3)
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"step-4: .*state.pt holds step 6, its directory's name says step 4"):
        checkpoint.load_sharded(step_4, fresh, torch.optim.AdamW(fresh.parameters()), False,
                                distributed.Dist())
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"step-6: .*exp_avg holds inf or NaN"):
        checkpoint.load_sharded(step_6, fresh, torch.optim.AdamW(fresh.parameters()), False,
                                distributed.Dist())


def test_a_sharded_save_whose_peer_ended_fails_with_its_own_error(tmp_path, monkeypatch):
    """Rank 0's sharded save whose other rank ended mid-write (the collective fails): the
    save's own error, one line naming the checkpoint, reaches the run, not that of telling the
    ended rank (which fails as well), and nothing is published."""
    import torch.distributed.checkpoint as dcp

    told = []

    def broadcast(value, dist):
        told.append(value)
        if value == "failed":
            raise RuntimeError("Connection closed by peer")
        return value

    def save(state, checkpoint_id):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(checkpoint, "broadcast", broadcast)
    monkeypatch.setattr(checkpoint, "all_gather", lambda value, dist: [value, None])
    monkeypatch.setattr(dcp, "save", save)
    model = torch.nn.Linear(4, 3)
    step = tmp_path / "run" / rundir.CHECKPOINTS_DIR / "step-2"
    with pytest.raises(OSError, match=r"step-2: could not write it.*Connection closed by peer"):
        checkpoint.save_sharded(step, checkpoint.RunState(step=2), {}, model,
                                torch.optim.AdamW(model.parameters()), False,
                                distributed.Dist(0, 2, 0))
    assert told[-1] == "failed" and not step.exists()


def test_a_sharded_save_on_a_full_disk_fails_with_one_oserror_naming_the_checkpoint(
        tmp_path, monkeypatch):
    """DCP's own failure (its CheckpointException, a BaseException) of a shard write on a full
    disk reaches the run as the one-line OSError every checkpoint write gives, naming the
    checkpoint and the full disk, and nothing is published."""
    import errno

    import torch.distributed.checkpoint as dcp

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    model = torch.nn.Linear(4, 3)
    step = tmp_path / "run" / rundir.CHECKPOINTS_DIR / "step-2"
    with pytest.raises(OSError, match=r"step-2: could not write it: the disk is full"):
        checkpoint.save_sharded(step, checkpoint.RunState(step=2), {}, model,
                                torch.optim.AdamW(model.parameters()), False,
                                distributed.Dist())
    assert not step.exists()


def test_a_sharded_checkpoint_moves_only_to_process_counts_that_share_its_batch(tmp_path):
    """A sharded checkpoint of a global batch of 8 continues on 4 processes of 2 (not bit-exact:
    other RNG states) and on 1 of 8; 3 processes cannot share 8 examples evenly: refused, naming
    the counts that can."""
    step = tmp_path / "step-6"
    (step / checkpoint.SHARDED_DIR).mkdir(parents=True)
    (step / checkpoint.CONFIG_FILE).write_text(json.dumps({"batch_size": 4, "grad_accum": 1}))
    assert checkpoint.check_writers(step, writers=2, world=2, per_process=4)
    assert not checkpoint.check_writers(step, writers=2, world=4, per_process=2)
    assert not checkpoint.check_writers(step, writers=2, world=1, per_process=8)
    with pytest.raises(ValueError, match=r"batch of 8 .* 3 processes .*N of 1, 2, 4, 8 .*"
                                         r"batch_size x grad_accum = 8 / N"):
        checkpoint.check_writers(step, writers=2, world=3, per_process=3)


def test_resume_of_a_sharded_checkpoint_directory_names_its_run(tmp_path):
    """--resume RUN/checkpoints/step-N of a sharded checkpoint (a config.json, no .safetensors)
    is weights, not a run: refused naming the run, as a one-file checkpoint is."""
    run = tmp_path / "run"
    step = run / rundir.CHECKPOINTS_DIR / "step-2"
    model = torch.nn.Linear(4, 3)
    checkpoint.save_sharded(step, checkpoint.RunState(step=2), {}, model,
                            torch.optim.AdamW(model.parameters()), False, distributed.Dist())
    with pytest.raises(ValueError, match=rf"weights .*--resume {run} continues"):
        plan.validate_config(trainconfig.TrainConfig(resume=str(step), max_steps=4))


def test_fsdp_is_refused_outside_torchrun_and_with_what_it_cannot_shard(monkeypatch, tmp_path):
    """One line naming the key and the way on: fsdp needs torchrun; under it a 16-bit base,
    muon and compile are refused, a quantized base is taken."""
    cfg = trainconfig.TrainConfig(strategy="fsdp", max_steps=4, preset="tiny")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"strategy.*torchrun --nproc_per_node"):
        plan.validate_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan.validate_config(cfg)
    base = dict(init_from=str(tiny_llama(tmp_path)), lora_r=4)
    for bits in (4, 8):
        plan.validate_config(dataclasses.replace(cfg, **base, quantize_bits=bits))
    for changed, words in [({**base, "base_dtype": "bf16"}, r"base_dtype.*fp32"),
                           ({"optimizer": "muon"}, r"optimizer.*adamw"),
                           ({"compile": True}, r"compile.*eager")]:
        with pytest.raises(ValueError, match=words):
            plan.validate_config(dataclasses.replace(cfg, **changed))
    with pytest.raises(SystemExit):
        trainconfig.build_parser().parse_args(["--strategy", "zero3"])
