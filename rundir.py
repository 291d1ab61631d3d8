"""The run directory's layout, its one home: trainingmanager writes it; eval.py, recipes.py,
hyperparam_tune.py (through trainingmanager) and pretrained.py's advice on a run given as a
checkpoint name its parts from here. A ground-floor module, so every floor may import it."""

# runs/<name>/ holds CONFIG_FILE, METRICS_FILE, tokenizer.json, LOCK_FILE, TB_DIR/,
# CHECKPOINTS_DIR/<CHECKPOINT_PREFIX>N/, BEST_DIR/, EXPORT_DIR/ and EVAL_DIR/ (and
# INIT_ADAPTER_COPY); is_run_dir tells one from any other directory.
CONFIG_FILE = "config.json"  # the resolved TrainConfig; each checkpoint and best/ hold a copy
# An init_adapter run's copy of the adapter's adapter_config.json, written with its CONFIG_FILE:
# continued from its weights (a resume, eval.py) it takes its LoRA layout there, not from the
# adapter directory, which it needs only at its start (run_adapter_copy).
INIT_ADAPTER_COPY = "init_adapter_config.json"
METRICS_FILE = "metrics.jsonl"  # one line per log step and per evaluation (_RunLog)
TB_DIR = "tb"  # TensorBoard events
CHECKPOINTS_DIR = "checkpoints"  # one CHECKPOINT_PREFIX<step> directory per checkpoint
BEST_DIR = "best"  # the best-by-validation weights, their BEST_METRICS and CONFIG_FILE
BEST_METRICS = "metrics.json"  # in best/: {"step": the step of its weights, **val metrics}
EXPORT_DIR = "export"  # HF model + tokenizer, or a LoRA run's adapter (PEFT layout)
MERGED_DIR = "merged"  # in export/: a LoRA run's merged model (export_merged)
EVAL_DIR = "eval"  # recipes.py's evaluation of the run
# An HF model directory's config (export/, export/merged/, an init_from): HF's name, which stays
# when the run's CONFIG_FILE is renamed.
HF_CONFIG = "config.json"

MODEL_FILE = "model.safetensors"  # the full model's tensors
ADAPTER_FILE = "adapter.safetensors"  # only the trainable tensors (LoRA on a pretrained base)
STATE_FILE = "state.pt"  # optimizer, scheduler, scaler, RNG of every rank, progress
CHECKPOINT_PREFIX = "step-"
EXPORT_RECORD = "codelm_export.json"  # in export/: {"best_step": the step of best/ it holds}
LOCK_FILE = ".lock"  # held (flock) by the run that runs in the directory; holds its owner_tag
WRITTEN_BEFORE_CONFIG = ("tokenizer.json", "tokenizer_config.json")  # the run's tokenizer
