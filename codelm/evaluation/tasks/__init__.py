"""The evaluation's tasks, one module each, named in the registry (``registry.TASKS``)."""
