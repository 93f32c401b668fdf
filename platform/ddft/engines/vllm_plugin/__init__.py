"""ddft's Video-LLaVA for vLLM, registered out of tree.

vLLM has no Video-LLaVA of its own, so ddft brings one (`video_llava.py`), built from vLLM's CLIP
and Llama blocks. vLLM calls `register()` in every process it starts (the engine core is a spawned
process) through the `vllm.general_plugins` entry point in pyproject.toml, so a base whose
config.json says `VideoLlavaForConditionalGeneration` resolves to it. The model module is named as
a string: vLLM imports it (and torch) only when a model of that architecture is built.
"""

ARCHITECTURE = "VideoLlavaForConditionalGeneration"
MODEL = "ddft.engines.vllm_plugin.video_llava:VideoLlavaForConditionalGeneration"
# Mixed into vLLM's workers: the engine's collective_rpc puts adapters' projectors in every worker.
WORKER_EXTENSION = "ddft.engines.vllm_plugin.projectors.ProjectorWorker"
# The multi-modal processor kwarg naming a request's projector slot (0: the base's projector).
PROJECTOR_KWARG = "ddft_projector"
# Adapters' projectors on the device at once (a worker's host memory holds every resident one);
# `ddft plan` counts this many copies
PROJECTORS_ON_DEVICE = 16


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL)
