"""llm_falcon_model."""
