"""Evaluation's parts: its settings (config), the metrics, a model's prompts and losses (scoring),
the corpus scored, results.json and the table (results), and the tasks behind a registry."""
