"""The data pipeline's parts, below ``dataset.py``: config, sources, cleaning, dedupe, shards,
splits, cache, examples, encoding, datasets."""
