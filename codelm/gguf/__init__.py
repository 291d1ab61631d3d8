"""A model as GGUF for llama.cpp, Ollama and LM Studio: ``writer`` (the file and its Ollama
Modelfile) and the command, ``python -m codelm.gguf``."""
