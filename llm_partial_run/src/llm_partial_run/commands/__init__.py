"""The sub-commands of ``llm-partial-run``, one module each."""
