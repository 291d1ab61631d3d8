"""Training a run: ``plan`` (the settings against the files they name, preset auto, the time
budget), ``build`` (the run directory, tokenizer, data, model and trainer; a resumed checkpoint),
``batches`` (a run's batches, their order and epochs, packing), ``trainer`` (one optimizer step,
one evaluation), ``optim`` (AdamW, or Muon with AdamW), ``record`` (what a run keeps as it trains),
``finish`` (the export, its sample, the final evaluation) and ``grpo`` (the GRPO-family losses,
advantages and log-probs, as TRL computes them)."""
