"""llm_sampler: generation and scoring driven by any ``forward_func(input_ids) -> logits``.

Imports torch only. See the package README for the forward-function contract.
"""

from .errors import SamplerError
from .forward import ForwardFunc, accepts_mask
from .generation import STOPPED, generate, generate_stream
from .hf import HFCausalLM
from .processors import LogitsProcessor, min_p, repetition_penalty, temperature, top_k, top_p
from .sampling import Sampler, SamplingConfig, make_logits_processors, make_sampler
from .scoring import ContinuationScores, MultipleChoice, multiple_choice, score_continuations

__all__ = [
    "STOPPED",
    "ContinuationScores",
    "ForwardFunc",
    "HFCausalLM",
    "LogitsProcessor",
    "MultipleChoice",
    "Sampler",
    "SamplerError",
    "SamplingConfig",
    "accepts_mask",
    "generate",
    "generate_stream",
    "make_logits_processors",
    "make_sampler",
    "min_p",
    "multiple_choice",
    "repetition_penalty",
    "score_continuations",
    "temperature",
    "top_k",
    "top_p",
]
