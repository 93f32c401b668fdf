"""vLLM's raw logprobs taken before a grammar's mask, as the hf engine takes them.

vLLM's sampler computes its raw_logprobs (logprobs_mode, the default) from the logits it is handed,
but its model runner has already applied the structured-output requests' grammar bitmask to them
(vllm 0.32: GPUModelRunner.sample_tokens calls apply_grammar_bitmask, then _sample): a constrained
row's logprobs would be -inf outside its grammar and renormalized over the rest. ddft's contract is
the model's own distribution on both engines, so in the worker that builds the model the mask's call
is wrapped: when the batch asks for logprobs it keeps the log_softmax of the logits before masking,
and the sampler's compute_logprobs of that very tensor (the same object, the same step) returns it.
Any other call computes as vLLM does. test_engine_vllm checks a constrained row against hf.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)
_kept = threading.local()  # (the logits tensor, its log_softmax before the mask)


def take_raw_logprobs_before_grammar() -> None:
    """Wrap vLLM's grammar mask and sampler logprobs once per process (idempotent)."""
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker import gpu_model_runner as runner

    apply, compute = runner.apply_grammar_bitmask, Sampler.compute_logprobs
    if getattr(apply, "ddft", False):
        return

    def apply_after_keeping_raw(scheduler_output, grammar_output, input_batch, logits):
        _kept.value = (logits, compute(logits)) if input_batch.max_num_logprobs is not None else None
        apply(scheduler_output, grammar_output, input_batch, logits)

    def compute_logprobs(logits):
        kept, _kept.value = getattr(_kept, "value", None), None
        return kept[1] if kept is not None and kept[0] is logits else compute(logits)

    apply_after_keeping_raw.ddft = True
    runner.apply_grammar_bitmask = apply_after_keeping_raw
    Sampler.compute_logprobs = staticmethod(compute_logprobs)
    log.debug("ddft: vLLM's raw logprobs are taken before the grammar mask")
