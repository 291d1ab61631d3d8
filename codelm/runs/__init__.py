"""A run on disk: ``rundir`` (the run directory's file names, claiming and locking it),
``checkpoint`` (save, restore and verify one ``RunState``) and ``trackers`` (metrics.jsonl and
TensorBoard, W&B, MLflow)."""
