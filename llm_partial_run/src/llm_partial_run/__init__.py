"""llm_partial_run."""
