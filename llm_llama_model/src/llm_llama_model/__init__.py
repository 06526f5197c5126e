"""llm_llama_model."""
