"""llm_sepweight."""
