"""llm_sampler."""
