"""Running untrusted Python, confined: ``runner`` (``run_python``, its limits and results),
``bootstrap`` (the program each run starts, standard library only, and the plain data both sides
speak) and the command, ``python -m codelm.sandbox FILE``."""
