"""trainingmanager in processes: kill -9 and signals (SIGINT, SIGTERM, SIGHUP) mid-run, the
run directory's lock, and DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import procs
import pytest
import torch
from procs import popen, signal_when
from safetensors.torch import load_file
from test_trainingmanager import (
    ENV,
    ROOT,
    _interrupted_then_resumed,
    _resume,
    _tiny_config_file,
    assert_bit_equal,
    final_weights,
    sigterm_at_step,
    tiny_cfg,
    tiny_llama,
    write_config,
)

import trainingmanager as tm
from codelm import loading, trainconfig
from codelm.runs import checkpoint as checkpoint_module
from codelm.runs import rundir, trackers
from codelm.runtime import distributed, process
from codelm.runtime.settings import fields_of
from codelm.training import build, plan
from codelm.training import trainer as trainer_module
from tokenizer import CodeTokenizer, load_tokenizer


def model_settings(cfg: trainconfig.TrainConfig) -> trainconfig.ModelSettings:
    """What a run builds its model from (loading.build_model), of ``cfg``."""
    return trainconfig.ModelSettings(**fields_of(trainconfig.ModelSettings, cfg))


def logged_epochs(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, kind, epoch) of each line of a run's metrics.jsonl."""
    lines = (Path(run_dir) / rundir.METRICS_FILE).read_text().splitlines()
    return [(m["step"], m["kind"], m["epoch"]) for m in map(json.loads, lines)]


def test_a_kill_while_old_checkpoints_are_removed_leaves_no_checkpoint_half_gone(
        assets, tmp_path, monkeypatch):
    """Pruning renames step-N out of the checkpoints' names before removing it (the next start
    removes what is left): a kill mid-removal leaves no visible step-N without its weights."""
    root, removing, rmtree = tmp_path / "runs" / "run" / rundir.CHECKPOINTS_DIR, [], shutil.rmtree

    def kill_in_checkpoints(path, *args, **kwargs):
        if Path(path).parent != root:
            return rmtree(path, *args, **kwargs)
        removing.append(Path(path))  # as if killed before anything was removed

    monkeypatch.setattr(shutil, "rmtree", kill_in_checkpoints)
    tm.train(tiny_cfg(assets, tmp_path, max_steps=8, keep_last=1))
    assert [p.name for p in rundir.list_checkpoints(root.parent)] == ["step-8"]
    assert removing and all(p.name.startswith(".step-") for p in removing)
    monkeypatch.undo()
    tm.train(tiny_cfg(assets, tmp_path, max_steps=12, keep_last=1, resume=str(root.parent)))
    assert sorted(p.name for p in root.iterdir()) == ["step-12"]


def test_the_next_tokenizer_cache_write_removes_what_a_killed_one_left(assets, tmp_path):
    """The data cache is shared by runs (no run lock, no clean_partial_writes): a run killed while
    caching its tokenizer leaves its temp directory there. The next write there removes
    the temp directories of dead writers, of any entry (a key may never be written again), never
    one a live run is writing."""
    import multiprocessing

    cache = tmp_path / "cache"
    cfg = tiny_cfg(assets, tmp_path, tokenizer=None,
                   data_options={"cache_dir": str(cache), "progress": False})
    dcfg = trainconfig.data_config(cfg, cfg.block_size)

    def killed_run():
        def save(self, path):
            (Path(path) / "tokenizer.json").write_text("{half")
            os.kill(os.getpid(), signal.SIGKILL)

        CodeTokenizer.save = save
        build.load_or_train_tokenizer(cfg, dcfg)

    child = multiprocessing.get_context("fork").Process(target=killed_run)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    [partial] = [p.name for p in cache.iterdir() if p.name.startswith(".tokenizer-")]
    assert f".tmp-{child.pid}@" in partial
    live = cache / partial.replace(f"-{child.pid}@", f"-{os.getppid()}@")  # this test's parent's
    live.mkdir()
    (cache / partial.replace(".tokenizer-", ".tokenizer-other")).mkdir()  # a dead one
    tok = build.load_or_train_tokenizer(cfg, dcfg)  # the re-run
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [live.name]
    [entry] = cache.glob("tokenizer-*")
    assert load_tokenizer(entry).vocab_size == tok.vocab_size


# Dropout and accumulation on, so RNG state and data position must both come back.
STRAIGHT = dict(dropout=0.1, grad_accum=2, max_steps=10)


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> Path:
    """The run directory of a run of STRAIGHT never stopped, checkpoints every 4 steps: the
    weights, optimizer state and metrics every stopped-and-resumed run of STRAIGHT ends on."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons between processes
    try:
        return tm.train(tiny_cfg(assets, tmp_path_factory.mktemp("straight"), name="straight",
                                 **STRAIGHT)).run_dir
    finally:
        torch.set_num_threads(before)


# [write] is slow; quick cover: [step] (kill -9, then a bit-exact resume) and test_trainingmanager's
# test_a_writer_killed_between_its_renames_leaves_the_old_copy_for_the_next_write (a kill inside
# a checkpoint's write)
@pytest.mark.parametrize("mode", ["step", pytest.param("write", marks=pytest.mark.slow)])
def test_resume_after_kill_9_is_bit_exact(assets, tmp_path, straight, mode):
    """Dropout and accumulation on (STRAIGHT), so RNG state and data position must both come
    back; the resumed run's metrics lines go on with the epochs the uninterrupted run logged."""
    cfg = tiny_cfg(assets, tmp_path, name="killed", **STRAIGHT)
    proc, run = _interrupted_then_resumed(cfg, tmp_path, mode, 7 if mode == "step" else 8)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"]
    if mode == "write":  # the half-written checkpoint is a temporary directory, never step-8
        assert any(p.name.startswith(".step-8.tmp-") for p in (run / "checkpoints").iterdir())
    _resume(run)
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    assert_bit_equal(final_weights(straight, 10), final_weights(run, 10))
    a = torch.load(straight / "checkpoints/step-10/state.pt", weights_only=True)
    b = torch.load(run / "checkpoints/step-10/state.pt", weights_only=True)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert {k: v for k, v in a.items() if k not in ("optimizer", "rng")} == {
        k: v for k, v in b.items() if k not in ("optimizer", "rng")}
    assert logged_epochs(run) == logged_epochs(straight)
    assert logged_epochs(run)[-1][2] > 0


_HUNG_UP_AT_STEP = 3  # metrics.jsonl's train lines (log_every 1) before the terminal goes away


@pytest.mark.slow
def test_a_closed_terminal_saves_a_checkpoint_and_exits_129(assets, tmp_path):
    """A real hangup: the trainer runs on a pseudo-terminal as its session leader (as a login
    shell's job on an SSH session), its progress bar on; the terminal's other end closes, the
    kernel sends SIGHUP and fails every later write to the terminal (EIO). The run saves a
    checkpoint and exits 129, dying neither of the signal itself nor of its stop message."""
    import fcntl
    import select
    import termios

    cfg = tiny_cfg(assets, tmp_path, name="hung", max_steps=100_000, save_every=100_000,
                   eval_every=100_000, progress=True)
    config = write_config(cfg, tmp_path / "hung.json")
    run = Path(cfg.out_dir) / cfg.name
    terminal, side = os.openpty()

    def session_of_its_own() -> None:  # ``side`` becomes the child's controlling terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, str(ROOT / "trainingmanager.py"), "--config",
                             str(config)], stdin=side, stdout=side, stderr=side, cwd=ROOT,
                            env=ENV, preexec_fn=session_of_its_own)
    os.close(side)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([terminal], [], [], 0.05)[0]:
                os.read(terminal, 1 << 16)  # as the terminal shows it
            metrics = run / rundir.METRICS_FILE
            if metrics.is_file() and metrics.read_text().count('"train"') >= _HUNG_UP_AT_STEP:
                break
        os.close(terminal)  # the SSH session drops
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 129, code
    (checkpoint,) = rundir.list_checkpoints(run)
    assert rundir.checkpoint_step(checkpoint) >= _HUNG_UP_AT_STEP


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_bit_exact(assets, tmp_path):
    """SIGTERM mid-run saves a checkpoint at the step it reached and exits 143; --resume from it
    ends with weights bit-equal to a run never stopped, so a preempted job loses nothing."""
    common = dict(dropout=0.1, max_steps=10)
    straight = tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    cfg = tiny_cfg(assets, tmp_path, name="stopped", **common)
    proc, run = _interrupted_then_resumed(cfg, tmp_path, "sigterm", 6)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "SIGTERM: checkpoint saved at step 6" in proc.stdout
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4", "step-6"]
    _resume(run)
    assert_bit_equal(final_weights(straight.run_dir, 10), final_weights(run, 10))


# The run's script with step AT's first attention never returning, as one operation of a long
# block's step runs on for minutes (the trainer's own stop check before it has passed); READY
# is created as it starts.
STUCK_IN_A_STEP = r"""
import sys, threading
from pathlib import Path
from codelm.training import trainer
import trainingmanager as tm

ready, at = Path(sys.argv[1]), int(sys.argv[2])
original, calls = trainer.Trainer.train_step, [0]


def train_step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        def never_returns(module, inputs):
            ready.touch()
            threading.Event().wait()

        self.raw_model.blocks[0].attn.register_forward_pre_hook(never_returns)
    return original(self, *args, **kwargs)


trainer.Trainer.train_step = train_step
sys.exit(tm.main(sys.argv[3:]))
"""


def test_a_stop_while_one_operation_of_a_step_runs_on_ends_the_run_at_once(assets, tmp_path,
                                                                          straight):
    """SIGTERM while step 6 is inside an operation that never returns (Python runs a signal's
    handler only between operations): the run ends all the same, exit 143, within the wait's
    bound, having dropped the step: the checkpoint is of step 5 with step 6's data order and
    RNG, metrics.jsonl is whole up to step 5, and the resume ends bit-equal to a run never
    stopped (dropout and accumulation on: STRAIGHT)."""
    cfg = tiny_cfg(assets, tmp_path, name="stopped", **STRAIGHT)
    config = write_config(cfg, tmp_path / "stopped.json")
    ready = tmp_path / "inside-the-operation"
    proc = popen([sys.executable, "-c", STUCK_IN_A_STEP, str(ready), "6", "--config",
                  str(config)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    out, err = signal_when(proc, ready.exists, signal.SIGTERM)  # or TimeoutExpired: still stuck
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: step 6 dropped mid-way" in out
    assert "SIGTERM: checkpoint saved at step 5" in out
    run = Path(cfg.out_dir) / "stopped"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4", "step-5"]
    assert [step for step, kind, _ in logged_epochs(run) if kind == "train"] == [1, 2, 3, 4, 5]
    _resume(run)
    assert_bit_equal(final_weights(straight, 10), final_weights(run, 10))


def _torchrun(nproc: int, *args: str, env: dict = ENV) -> subprocess.CompletedProcess:
    """``torchrun`` of ``nproc`` processes on this machine, its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _on_two_ranks(*args: str) -> subprocess.CompletedProcess:
    """Two gloo ranks on this machine's CPU (its GPUs hidden)."""
    return _torchrun(2, *args, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(assets, tmp_path):
    """Two DDP processes train the weights, validation losses and epochs of one process with the
    same global batch, rank 0 reporting; resuming their run on one process is refused, as it would
    halve the global batch."""
    # adam_eps 1e-6: with 1e-8, Adam turns gradients of ~1e-8 into ~lr-sized updates, so the
    # reduction-order rounding of any two correct summations would show up in the weights.
    common = dict(max_steps=4, grad_accum=2, eval_every=2, save_every=2, adam_eps=1e-6,
                  device="cpu")  # as the two gloo ranks
    single = tm.train(tiny_cfg(assets, tmp_path, name="single", batch_size=4, **common))
    cfg = tiny_cfg(assets, tmp_path, name="ddp", batch_size=2, **common)
    config = write_config(cfg, tmp_path / "ddp.json")
    proc = _on_two_ranks("trainingmanager.py", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr  # torch 2.13: broadcast_buffers deprecated
    run = Path(cfg.out_dir) / "ddp"
    a, b = final_weights(single.run_dir, 4), final_weights(run, 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert not torch.equal(a["wte.weight"], load_file(
        single.run_dir / "checkpoints/step-2" / rundir.MODEL_FILE)["wte.weight"])
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
           if '"val"' in x]
    ref = [json.loads(x) for x in (single.run_dir / "metrics.jsonl").read_text().splitlines()
           if '"val"' in x]
    assert [v["val_loss"] for v in val] == pytest.approx([v["val_loss"] for v in ref], rel=1e-5)
    assert proc.stdout.count("best validation loss") == 1  # rank 0 reports for all
    # epoch counts the examples of both processes: the same as one process's global batch
    assert logged_epochs(run) == logged_epochs(single.run_dir)

    # One process would halve the global batch (and reseed every stream): refused.
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1.*"
                                         r"global batch.*from 8 to 4"):
        tm.train(dataclasses.replace(cfg, resume=str(run), max_steps=8))


COUNTING_LIVE_DDP_MODELS = """
import gc, sys
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel
import trainingmanager as tm
gc.disable()  # no lucky collection: only the trainer's own frees the model
destroy = td.destroy_process_group
def counting(*args, **kwargs):
    live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"live DDP models at destroy_process_group: {live}", flush=True)
    return destroy(*args, **kwargs)
td.destroy_process_group = counting
sys.exit(tm.main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~15 s: two ranks; every quick DDP test also exits through the same teardown
@pytest.mark.parametrize("failing", [False, True])
def test_ddp_model_is_freed_before_the_group_is_destroyed(assets, tmp_path, failing):
    """The DDP model sits in reference cycles; left to the collection at interpreter exit, gloo's
    threads would die in a half torn-down process (now and then SIGABRT, "terminate called
    without an active exception"). It is freed before the group is destroyed, after a run that
    finished and after one that failed (whose error's traceback holds the trainer)."""
    cfg = tiny_cfg(assets, tmp_path, name="freed", max_steps=2, eval_every=2, save_every=2,
                   inject_nan_at_step=2 if failing else None)
    script = tmp_path / "counting.py"
    script.write_text(COUNTING_LIVE_DDP_MODELS)
    proc = _on_two_ranks("--tee", "1", str(script), "--config",
                         str(write_config(cfg, tmp_path / "freed.json")))
    assert (proc.returncode != 0) == failing, proc.stderr[-3000:]
    assert proc.stdout.count("live DDP models at destroy_process_group: 0") == 2, proc.stdout


FAILING_SECOND_CHECKPOINT = """
import errno, sys
from codelm.runs import checkpoint
import trainingmanager as tm
save, calls = checkpoint.save, []
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
    return save(*args, **kwargs)
checkpoint.save = failing
sys.exit(tm.main(sys.argv[1:]))
"""


@pytest.mark.slow  # the quick suite has its setup-error twin
def test_ddp_rank_zero_write_error_stops_every_rank_with_its_one_line(assets, tmp_path):
    """Only rank 0 writes checkpoints: its full disk stops rank 1 too, with no lost connection
    (a gloo traceback), and the error is printed once, not once per rank."""
    cfg = tiny_cfg(assets, tmp_path, name="full", max_steps=8, save_every=2, eval_every=8)
    config = write_config(cfg, tmp_path / "full.json")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_SECOND_CHECKPOINT)
    proc = _on_two_ranks(str(script), "--config", str(config))
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert "step-4: No space left on device" in proc.stderr
    assert "Connection closed" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_ddp_rank_zero_setup_error_stops_every_rank_with_its_one_line(assets, tmp_path):
    """Only rank 0 reads the tokenizer: its error stops rank 1 too, with no lost connection
    (a gloo traceback) beside rank 0's one-line error."""
    cfg = tiny_cfg(assets, tmp_path, name="badtok", tokenizer=str(tmp_path / "nope.json"))
    config = write_config(cfg, tmp_path / "badtok.json")
    proc = _on_two_ranks("trainingmanager.py", "--config", str(config))
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "nope.json" in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def _train_lines(run: Path) -> int:
    metrics = run / rundir.METRICS_FILE
    return metrics.read_text().count('"train"') if metrics.is_file() else 0


def _stop_torchrun_mid_run(cfg: trainconfig.TrainConfig, tmp_path: Path,
                           sig: str) -> tuple[str, str]:
    """Start ``cfg`` on two CPU ranks under torchrun, send torchrun alone ``sig`` once two
    steps are done, and wait until every rank has ended (a watchdog fails the test after a
    bound); torchrun's exit code is checked here; the run's (stdout, stderr)."""
    run, out, err = Path(cfg.out_dir) / cfg.name, tmp_path / "out.txt", tmp_path / "err.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "trainingmanager.py", "--config", str(write_config(cfg, tmp_path / "run.json"))]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        torchrun = procs.popen(command, cwd=ROOT, env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
                               stdout=stdout, stderr=stderr)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while _train_lines(run) < 2:
            assert time.monotonic() < deadline and torchrun.poll() is None, err.read_text()
            time.sleep(0.05)
        ranks = procs.children(torchrun.pid)
        assert len(ranks) == 2, ranks
        torchrun.send_signal(signal.Signals[sig])
        # torchrun's stop: exit 1 once its processes have stopped; its kill -9 ends it at once
        assert torchrun.wait(timeout=120) == (-signal.SIGKILL if sig == "SIGKILL" else 1)
        deadline = time.monotonic() + 120  # the watch stops them within seconds on an idle box
        while not all(procs.exited(rank) for rank in ranks):
            assert time.monotonic() < deadline, f"a rank outlived torchrun's {sig}"
            time.sleep(0.05)
    finally:
        torchrun.kill()
        for rank in ranks:
            if not procs.exited(rank):
                os.kill(rank, signal.SIGKILL)
    return out.read_text(), err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig, strategy", [("SIGKILL", "ddp"), ("SIGKILL", "fsdp"),
                                           ("SIGTERM", "ddp")])
def test_every_rank_stops_with_a_checkpoint_when_torchrun_is_stopped_or_killed_outright(
        assets, tmp_path, sig, strategy):
    """torchrun starts each rank in a session of its own, so its kill -9 tells them nothing:
    each rank watches it, and stopped either way they all stop as on torchrun's SIGTERM, within
    a bound, at one step: its checkpoint, rank 0's one line naming the resume, no rank's
    traceback (what torchrun prints of its own stop is its own). The run resumes."""
    cfg = tiny_cfg(assets, tmp_path, name="stopped", max_steps=100_000, eval_every=100_000,
                   save_every=100_000, strategy=strategy, device="cpu")
    out, err = _stop_torchrun_mid_run(cfg, tmp_path, sig)
    run = Path(cfg.out_dir) / cfg.name
    [checkpoint] = rundir.list_checkpoints(run)
    step = rundir.checkpoint_step(checkpoint)
    assert out.count(f"SIGTERM: checkpoint saved at step {step}; continue with --resume {run}"
                     ) == 1, out[-3000:] + err[-3000:]
    assert ("torchrun is gone" in err) == (sig == "SIGKILL"), err[-3000:]
    assert "[rank" not in err and "interrupted" not in err, err[-3000:]
    proc = _on_two_ranks("trainingmanager.py", "--resume", str(run), "--max-steps",
                         str(step + 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed {run} from step-{step}" in proc.stdout


@pytest.mark.parametrize("sigs, code", [(("SIGTERM",), 143), (("SIGHUP", "SIGHUP"), 129)],
                         ids=["SIGTERM", "SIGHUP-twice"])
def test_a_stop_signal_saves_and_exits_non_zero_with_the_resume_hint(assets, tmp_path, capsys,
                                                                      monkeypatch, sigs, code,
                                                                      hangup_at_default):
    """SIGTERM: checkpoint, then exit 143 (so `train && eval` stops) and say how to go on. A
    hangup (a dropped SSH session; its SIGHUP comes from the kernel and again from the shell)
    the same, 129."""

    sigterm_at_step(monkeypatch, 2, *(signal.Signals[name] for name in sigs))
    config = _tiny_config_file(assets, tmp_path)
    assert tm.main(["--config", config]) == code
    run = tmp_path / "runs" / "run"
    assert f"{sigs[0]}: checkpoint saved at step 2; continue with --resume {run}" in (
        capsys.readouterr().out)
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-2"]
    assert process.interrupted_exit_code("SIGINT") == 130


def test_a_run_its_caller_restarts_says_so_on_a_stop_not_that_a_checkpoint_waits(
        assets, tmp_path, capsys, monkeypatch):
    """A run its caller restarts (codelm.recipes --smoke) says on a stop to start it again, not
    "checkpoint saved; continue with", which the restart would contradict."""
    sigterm_at_step(monkeypatch, 2)
    result = tm.train(tiny_cfg(assets, tmp_path), resume_hint="the same command", restarts=True)
    assert result.interrupted == "SIGTERM"
    out = capsys.readouterr().out
    assert "SIGTERM: stopped at step 2; start it again with the same command" in out
    assert "checkpoint" not in out


def test_a_stop_outside_the_step_loop_exits_with_the_signals_code(assets, tmp_path, capsys,
                                                                  monkeypatch):
    """SIGTERM while the data is prepared (before the loop's own handler) exits 143 with a
    one-line message, not as a bare kill, and Ctrl-C there exits 130, not with a traceback."""

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    config = _tiny_config_file(assets, tmp_path)
    monkeypatch.setattr(build, "load_or_train_tokenizer", killed)
    assert tm.main(["--config", config]) == 143
    assert "interrupted before the first checkpoint: nothing to resume" in capsys.readouterr().err
    monkeypatch.setattr(build, "load_or_train_tokenizer", ctrl_c)
    assert tm.main(["--config", config]) == 130


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT"])
def test_a_ctrl_c_after_a_stop_interrupts_with_its_own_code_a_repeated_sigterm_never(first):
    """A scheduler's SIGTERM reaches a sweep's worker twice (directly and forwarded): the
    second must not skip the checkpoint the first asked for. A SIGTERM changes nothing once a
    stop is under way (its SIGKILL follows anyway); a Ctrl-C after it stops at once, 130."""

    signals = trainer_module.StopSignals()
    try:
        signals._handle(signal.Signals[first], None)  # the first asks for a checkpoint
        signals._handle(signal.SIGTERM, None)
        signals._handle(signal.SIGTERM, None)
        assert signals.reason == first
        with pytest.raises(KeyboardInterrupt) as stop:
            signals._handle(signal.SIGINT, None)  # Ctrl-C: stop now
    finally:
        signals.restore()
    assert process.interrupted_exit_code(stop.value) == 130


def _another_rank_received(name: str):
    """An all_reduce_sum of StopSignals' flags (one a stop signal, then the time budget's) that
    adds another rank's, which received signal ``name``."""
    theirs = torch.tensor([float(sig == name) for sig in trainer_module.STOP_SIGNALS] + [0.0])
    return lambda flags, dist: flags + theirs


def test_a_stop_another_rank_received_is_under_way_on_this_one_too(monkeypatch):
    """A SIGTERM reaches the ranks each at its own moment (a scheduler's to every process, each
    rank's watch of a killed torchrun), and they agree to stop at the first one's: a rank's own
    SIGTERM after that agreement is a repeat, as on one process, and leaves the checkpoint
    under way and the stop's exit code as they are."""
    monkeypatch.setattr(trainer_module, "all_reduce_sum", _another_rank_received("SIGTERM"))
    with process.interrupt_on_sigterm():
        signals = trainer_module.StopSignals()
        try:
            assert signals.stop_requested(distributed.Dist(rank=0, world=2),
                                          torch.device("cpu")) == "SIGTERM"
        finally:
            signals.restore()
        try:
            signal.raise_signal(signal.SIGTERM)  # this rank's own, as its run ends
        except KeyboardInterrupt:
            pytest.fail("this rank's own SIGTERM interrupted the stop under way")


def _agreed_stop(monkeypatch, mine: str | None, theirs: str) -> str | None:
    """What StopSignals.stop_requested returns on rank 0 of two, which received ``mine`` (None:
    no signal) while the other rank received ``theirs``."""
    monkeypatch.setattr(trainer_module, "all_reduce_sum", _another_rank_received(theirs))
    signals = trainer_module.StopSignals()
    signals.reason = mine
    try:
        return signals.stop_requested(distributed.Dist(rank=0, world=2), torch.device("cpu"))
    finally:
        signals.restore(taken=True)
        process.forget_stop()


def test_every_rank_names_the_signal_another_rank_received(monkeypatch):
    """A SIGHUP to one rank alone stops every rank as that SIGHUP: rank 0 names it in its line
    and exits with its code (129), as the rank that received it does; ranks that received
    different signals agree on one of them."""
    stop = _agreed_stop(monkeypatch, None, "SIGHUP")
    assert stop == "SIGHUP"
    assert process.interrupted_exit_code(stop) == 129
    assert (_agreed_stop(monkeypatch, "SIGTERM", "SIGHUP")
            == _agreed_stop(monkeypatch, "SIGHUP", "SIGTERM"))

@pytest.fixture
def gloo_group(tmp_path):
    """A gloo process group of this process alone: its all-reduce sums this rank's flags."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_the_check_after_each_step_agrees_on_a_stop_a_check_later_with_nothing_left_in_flight(
        gloo_group, monkeypatch):
    """Under torchrun the check after each step reads back the flags summed at the check before
    and starts its own sum (no wait on the device's queued work): a SIGTERM, and the time
    budget, stop the run at the next check, the same one on every rank; every sum a check
    starts is read before the run ends. A check that reads at once (the run's end) sees a stop
    at once."""
    started = []

    def recorded(flags, dist, device):
        pending = distributed.all_reduce_sum_later(flags, dist, device)

        def arrived():
            pending.arrived()
            started.remove(read)

        read = distributed.PendingSum(pending.summed, arrived)
        started.append(read)
        return read

    monkeypatch.setattr(trainer_module, "all_reduce_sum_later", recorded)
    dist, cpu = distributed.Dist(rank=0, world=2), torch.device("cpu")
    signals = trainer_module.StopSignals()
    try:
        assert signals.stop_requested(dist, cpu, lagged=True) is None
        signals.reason = "SIGTERM"
        assert signals.stop_requested(dist, cpu, lagged=True) is None  # its sum is on its way
        assert len(started) == 1
        assert signals.stop_requested(dist, cpu, lagged=True) == "SIGTERM"
        assert started == []
        signals.reason = None
        assert signals.stop_requested(dist, cpu, over_time=True, lagged=True) is None
        assert signals.stop_requested(dist, cpu, lagged=True) == "time budget"
        assert started == []
        assert signals.stop_requested(dist, cpu, lagged=True) is None
        signals.reason = "SIGHUP"
        assert signals.stop_requested(dist, cpu) == "SIGHUP"
        assert started == []
    finally:
        signals.restore(taken=True)
        process.forget_stop()


def test_the_lock_names_a_live_holder_only(tmp_path):
    """The lock file keeps its last holder's tag after that run ends: a dead one holds nothing."""
    lock = tmp_path / rundir.LOCK_FILE
    lock.write_text(process.owner_tag())
    assert rundir.lock_holder(lock) == f"process {os.getpid()} on {socket.gethostname()}"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    lock.write_text(process.owner_tag().replace(f"{os.getpid()}@", f"{ended}@", 1))
    assert rundir.lock_holder(lock) is None


def test_two_runs_never_share_a_run_directory(assets, tmp_path, monkeypatch):
    """A run started while another holds the directory (both default-named in the same second,
    or given the same --name) never trains into it: a default name takes a free suffix; a
    given name is refused while the other run holds it, and free again once it has ended."""
    import time as real_time

    stamp = "20260101-000000"
    monkeypatch.setattr(rundir, "time", types.SimpleNamespace(perf_counter=real_time.perf_counter,
                                                          strftime=lambda fmt: stamp))
    name = f"tiny-lm-{stamp}"  # the preset, the task, the time
    started = []

    def start_others(step, metrics):  # while the first run trains (its first evaluation)
        if started:
            return
        started.append(tm.train(tiny_cfg(assets, tmp_path, name=None, max_steps=2,
                                         eval_every=2)).run_dir)
        # named by the process that holds it (this one: the first run trains in it)
        with pytest.raises(ValueError, match=rf"in use by another run.*process {os.getpid()} on "
                                             rf"{re.escape(socket.gethostname())}"):
            tm.train(tiny_cfg(assets, tmp_path, name=name, max_steps=2))

    first = tm.train(tiny_cfg(assets, tmp_path, name=None, max_steps=4), on_eval=start_others)
    assert first.run_dir.name == name and started == [first.run_dir.with_name(f"{name}-2")]
    for run, steps in ((first.run_dir, 4), (started[0], 2)):
        config = json.loads((run / "config.json").read_text())
        assert (config["name"], config["max_steps"]) == (run.name, steps)
        assert rundir.list_checkpoints(run)[-1].name == f"step-{steps}"
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume"):
        tm.train(tiny_cfg(assets, tmp_path, name=name, max_steps=2))  # ended: not in use
    third = tm.train(tiny_cfg(assets, tmp_path, name=None, max_steps=2, eval_every=2))
    assert third.run_dir.name == f"{name}-3"


def test_a_stop_signal_during_the_final_evaluation_exits_with_its_code(assets, tmp_path,
                                                                       capsys, monkeypatch):
    """The first SIGTERM during the end-of-run evaluation stops the run: a checkpoint, no
    export, exit 143, so `train && eval` stops; --resume then finishes it."""

    original = trainer_module.Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    config = _tiny_config_file(assets, tmp_path, max_steps=3, eval_every=100, export=True)
    assert tm.main(["--config", config]) == 143
    run = tmp_path / "runs" / "run"
    assert f"SIGTERM: checkpoint saved at step 3; continue with --resume {run}" in (
        capsys.readouterr().out)
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-3"]
    assert not (run / "export").exists()
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", original)
    assert tm.main(["--resume", str(run)]) == 0 and (run / "export" / "config.json").is_file()


def test_resume_of_a_run_killed_before_its_config_says_to_run_it_again(tmp_path, capsys):
    """A SIGKILL before config.json leaves the lock and the tokenizer: --resume says there is
    nothing to resume and to run the command again."""
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    for name in (rundir.LOCK_FILE, *rundir.WRITTEN_BEFORE_CONFIG):
        (run / name).write_text("")
    assert tm.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "run the command that started it again" in err


def test_an_interrupt_outside_the_step_loop_says_what_is_left_to_resume(assets, tmp_path,
                                                                        capsys, monkeypatch):
    """An interrupt outside the step loop says what is left: "nothing to resume" before the run
    directory exists and under --overfit (which writes none), else "checkpoints written are
    kept" with the run's own --resume directory."""

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    config = _tiny_config_file(assets, tmp_path, max_steps=4)
    run = tmp_path / "runs" / "run"

    def told(*words: str, unsaid: str) -> None:
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("interrupted"), err
        assert all(w in err for w in words) and unsaid not in err, err

    nothing = ("before the first checkpoint", "nothing to resume", "same command again")
    prepare = build.prepare
    monkeypatch.setattr(build, "prepare", ctrl_c)  # Ctrl-C while the data is tokenized
    assert tm.main(["--config", config]) == 130
    told(*nothing, unsaid="--resume")
    assert not run.exists()
    monkeypatch.setattr(build, "prepare", prepare)
    build_model = loading.build_model
    monkeypatch.setattr(loading, "build_model", ctrl_c)  # after the run's tokenizer is written
    assert tm.main(["--config", config]) == 130
    told(*nothing, unsaid="--resume")
    assert not run.exists()  # a default timestamped name would leave one dead directory each
    monkeypatch.setattr(loading, "build_model", build_model)
    assert tm.main(["--config", config]) == 0

    monkeypatch.setattr(build, "prepare", ctrl_c)  # a resume's: the run's checkpoints are kept
    assert tm.main(["--resume", str(run), "--max-steps", "8"]) == 130
    kept = ("checkpoints written are kept", f"--resume {run}")
    told(*kept, unsaid="nothing to resume")
    monkeypatch.setattr(build, "prepare", prepare)

    original, calls = trainer_module.Trainer.train_step, [0]

    def second_signal(self, *args, **kwargs):  # a second Ctrl-C stops at once, mid-step
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("SIGINT")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", second_signal)
    assert tm.main(["--resume", str(run), "--max-steps", "8"]) == 130
    told(*kept, unsaid="nothing to resume")
    monkeypatch.setattr(tm, "run_overfit", ctrl_c)
    assert tm.main(["--overfit", "--no-progress"]) == 130
    told(*nothing, unsaid="--resume")


def test_ddp_broadcasts_no_buffers_which_every_rank_computes_alike(tmp_path, monkeypatch):
    """DDP's default broadcast_buffers=True sends every buffer before each forward. Every buffer
    (rotary frequencies and cos/sin tables, LoRA row maps) is computed from the config and the
    weights, so each rank's copy is the same and training never changes it: the broadcast
    before each forward is turned off (torch 2.13's forward_sync_buffers; the deprecated broadcast_buffers warns on
    every rank). The quantized base's codes and scales are frozen parameters, not buffers."""

    import torch.nn.parallel

    built: dict = {}

    class Recorded(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module
            built.update(kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Recorded)
    cfg = trainconfig.TrainConfig(init_from=str(tiny_llama(tmp_path)), lora_r=4, quantize_bits=4,
                                  block_size=16)
    models = [loading.build_model(model_settings(cfg), types.SimpleNamespace(vocab_size=8))
              for _ in range(2)]
    buffers = [dict(m.named_buffers()) for m in models]
    assert {n.rsplit(".", 1)[-1].split("_")[0] for n in buffers[0]} == {
        "inv", "tables", "rows", "order", "pairs"}
    frozen = {n.rsplit(".", 1)[-1] for n, p in models[0].named_parameters() if not p.requires_grad}
    assert {"qweight", "scale"} <= frozen
    assert_bit_equal(buffers[0], buffers[1])  # two ranks build the same buffers
    before = {n: b.clone() for n, b in buffers[0].items()}
    trainer_cfg = plan.with_fallbacks(dataclasses.replace(cfg, max_steps=10, warmup_steps=1))
    step_settings = trainconfig.StepSettings(**fields_of(trainconfig.StepSettings, trainer_cfg))
    trainer = trainer_module.Trainer(models[0], step_settings, torch.device("cpu"),
                                     distributed.Dist(rank=0, world=2))
    assert isinstance(trainer.model, Recorded) and built["forward_sync_buffers"] is False
    ids = torch.randint(0, 64, (2, 16))
    trainer.raw_model(ids).float().mean().backward()
    trainer.optimizer.step()
    assert_bit_equal(before, dict(trainer.raw_model.named_buffers()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_on_one_gpu_trains_with_nccl_in_bf16(assets, tmp_path):
    """The GPU path end to end under torchrun: NCCL, DDP on cuda:0, precision auto -> bf16,
    a checkpoint and an export that transformers loads."""
    cfg = tiny_cfg(assets, tmp_path, name="nccl", max_steps=4, export=True)
    proc = _torchrun(1, "trainingmanager.py", "--config",
                     str(write_config(cfg, tmp_path / "nccl.json")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 on cuda:0" in proc.stdout, proc.stdout
    run = Path(cfg.out_dir) / "nccl"
    assert checkpoint_module.read_state(run / rundir.CHECKPOINTS_DIR / "step-4").precision == "bf16"
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(run / "export") is not None


def test_torchrun_with_more_processes_than_gpus_is_refused_on_every_rank(monkeypatch):
    """Two processes on a one-GPU machine: every rank refuses the launch before joining, naming
    --nproc_per_node and --device cpu, rather than the second crashing in
    torch.cuda.set_device while the first waits for it in init_process_group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **k: joined.append(k))
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        dist = distributed.this_process()
        with pytest.raises(ValueError, match=r"2 processes on 1 CUDA device.*"
                                             r"--nproc_per_node 1.*--device cpu"):
            distributed.join(dist, distributed.resolve_device("auto", dist))
    assert joined == []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per GPU: joins with NCCL
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist = distributed.this_process()
    assert distributed.join(dist, distributed.resolve_device("auto", dist))
    assert joined == [{"backend": "nccl"}]
    joined.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # --device cpu: gloo, GPUs not counted
    assert distributed.join(dist, distributed.resolve_device("cpu", dist))
    assert joined == [{"backend": "gloo"}]


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_dropout_and_share_the_validation_out(assets, tmp_path):
    """Two gloo ranks: the same init but each its own dropout stream (the per-rank torch RNG
    states a checkpoint records differ), and the validation examples split between them (the
    val_tokens of an evaluation are those of the whole split, once)."""
    cfg = tiny_cfg(assets, tmp_path, name="ddp", batch_size=2, max_steps=2, eval_every=2,
                   save_every=2, dropout=0.1)
    config = write_config(cfg, tmp_path / "ddp.json")
    proc = _on_two_ranks("trainingmanager.py", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(cfg.out_dir) / "ddp"
    rng = checkpoint_module.read_state(run / rundir.CHECKPOINTS_DIR / "step-2").rng
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    val = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()
           if json.loads(line)["kind"] == "val"]
    assert [v["val_tokens"] for v in val] == [8 * 32]  # 8 windows of 32 labels


class _Pruned(Exception):
    """What a sweep's on_eval raises to prune its trial."""


@pytest.mark.parametrize("where", ["error", "late"])
def test_a_stop_the_loop_did_not_act_on_is_passed_on_not_lost(assets, tmp_path, monkeypatch,
                                                              where):
    """SIGTERM during a step, then on_eval pruning the trial ("error"), or SIGTERM after the
    loop's last look ("late", as its log closes): the stop reaches the caller's handler (here
    interrupt_on_sigterm's), not lost behind the error or a finished run, so a sweep does not
    go on to its next trial, nor codelm.recipes to its evaluation."""

    def prune(step, metrics):
        raise _Pruned

    on_eval = None
    if where == "error":
        sigterm_at_step(monkeypatch, 2)
        on_eval = prune
    else:
        close = trackers.RunLog.close

        def close_with_a_stop(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)
            close(self, *args)

        monkeypatch.setattr(trackers.RunLog, "close", close_with_a_stop)
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2)
    with pytest.raises(rundir.RunInterrupted) as stop, process.interrupt_on_sigterm():
        tm.train(cfg, on_eval=on_eval)
    assert process.interrupted_exit_code(stop.value) == 143
    assert stop.value.resume == f"--resume {tmp_path / 'runs' / 'run'}"


def test_a_ctrl_c_after_a_sigterm_mid_step_stops_with_its_own_code_not_the_first_ones(
        assets, tmp_path, monkeypatch):
    """SIGTERM, then Ctrl-C within the same step: the Ctrl-C stops at once (130); the SIGTERM
    it overtook is not passed on again over it."""

    sigterm_at_step(monkeypatch, 2, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(rundir.RunInterrupted) as stop, process.interrupt_on_sigterm():
        tm.train(tiny_cfg(assets, tmp_path, max_steps=4))
    assert process.interrupted_exit_code(stop.value) == 130


def test_a_sigterm_after_a_ctrl_c_mid_step_still_saves_the_checkpoint(assets, tmp_path,
                                                                      monkeypatch):
    """Ctrl-C, then SIGTERM within the same step (a scheduler's stop meeting the user's): the
    SIGTERM changes nothing: it does not stop the run at once, without the checkpoint the
    Ctrl-C asked for."""

    sigterm_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGTERM)
    with process.interrupt_on_sigterm():
        result = tm.train(tiny_cfg(assets, tmp_path, max_steps=4))
    assert (result.interrupted, result.step) == ("SIGINT", 2)
    assert [p.name for p in rundir.list_checkpoints(result.run_dir)] == ["step-2"]


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
def test_the_step_loop_keeps_a_signal_its_process_ignores(assets, tmp_path, monkeypatch, name):
    """A run a script starts with `&` ignores Ctrl-C (the start-up guard keeps that), and so
    does the step loop's handler: the script's Ctrl-C does not stop the background run. A run
    under nohup ignores SIGHUP: a hangup must not stop it."""

    sig = signal.Signals[name]
    sigterm_at_step(monkeypatch, 2, sig)
    before = signal.signal(sig, signal.SIG_IGN)
    try:
        with process.interrupt_on_sigterm():  # as main runs it
            result = tm.train(tiny_cfg(assets, tmp_path, max_steps=4))
        assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        signal.signal(sig, before)
    assert (result.interrupted, result.step) == (None, 4)
