"""llm_slice_core: what every model slice shares (masks and positions, KV cache, packed weights)."""
