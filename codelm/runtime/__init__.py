"""The ground floor, importing nothing else of codelm: ``settings`` (config dataclasses <-> flags
and JSON/YAML files), ``process`` (signals, atomic writes, progress bars), ``distributed`` (a
torchrun job's ranks and collectives), ``hub`` (Hugging Face hub ids and their snapshots) and
``rng`` (seeding and the random streams' state)."""
