"""The parts of the tokenizers behind tokenizer.py: the tokenizer file, batch encoding, Python
source stripping, byte-level BPE and chat templates."""
