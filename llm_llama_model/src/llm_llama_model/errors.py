"""The one exception type this package raises for bad configs, weights and inputs."""


class LlamaModelError(ValueError):
    """A Llama config, weight file or forward input this package cannot run (message says why)."""
