"""The models: ``generation`` (KV cache, sampling, beam search, streaming) drives the decoder
architecture.py builds."""
