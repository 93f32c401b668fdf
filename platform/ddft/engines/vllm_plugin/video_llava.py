"""Video-LLaVA (`VideoLlavaForConditionalGeneration`) as a vLLM model, from vLLM's own blocks.

The HF model, which ddft trains, computes (transformers' modeling_video_llava.py):
  image: image_tower(pixels).hidden_states[vision_feature_layer][:, 1:] (strategy "default"
         drops CLS) -> multi_modal_projector -> one row per placeholder token
  video: video_tower(frames).hidden_states[vision_feature_layer] (CLS kept) per frame ->
         the same projector -> frames x (patches + 1) rows
and the language model (Llama) reads them in place of the `<image>` / `<video>` tokens. Here the
towers are vLLM's `CLIPVisionModel` built only up to the feature layer (so their last layer *is*
hidden_states[feature_layer], no post-norm), the language model is vLLM's Llama (paged KV,
continuous batching, multi-LoRA), and the checkpoint loads in both the transformers >= 4.52 layout
(`model.language_model.*`, `model.image_tower.*`, `lm_head.*`, ddft's bases) and the original one
of `LanguageBind/Video-LLaVA-7B-hf` (`language_model.model.*`, `image_tower.*`).

Pixels are prepared here (`clip_pixels`), not by transformers' VideoLlavaProcessor, whose video
processor needs torchvision (no CPU build beside vLLM's torch here); the result equals it to 1e-6.

DDFT's image/video adapters also train the projector in full (PEFT `modules_to_save`), which
vLLM's LoRA can't apply. vLLM applies their LoRA to the language model; the projector is applied
here per item: each request names a projector slot (processor kwarg `ddft_projector`, part of the
item's cache hash, so encoder outputs of one adapter are never reused for another) whose weights the
engine put in every worker's memory when it loaded the adapter (projectors.py): execution reads no
file. Slot 0 is the base's own projector; slot ids are never reused for other weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import BatchFeature, VideoLlavaConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ddft.engines.vllm_plugin import PROJECTOR_KWARG, PROJECTORS_ON_DEVICE
from ddft.engines.vllm_plugin.logprobs import take_raw_logprobs_before_grammar
from ddft.engines.vllm_plugin.pixels import clip_pixels
from ddft.engines.vllm_plugin.projectors import Projectors

log = logging.getLogger(__name__)

DUMMY_FRAMES = 8  # Video-LLaVA samples 8 frames per video; vLLM profiles memory with this many


def _layers_to_feature(config: VideoLlavaConfig) -> int:
    """CLIP layers up to the feature layer: hidden_states[k] is the output of layer k (0: embeddings)."""
    layer, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: ddft's Video-LLaVA for vLLM takes one feature layer")
    return layer if layer >= 0 else total + layer + 1


class VideoLlavaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> VideoLlavaConfig:
        return self.ctx.get_hf_config(VideoLlavaConfig)

    def get_hf_processor(self, **kwargs):
        raise NotImplementedError(
            "ddft's Video-LLaVA prepares pixels itself (clip_pixels); transformers' "
            "VideoLlavaProcessor needs torchvision"
        )

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1, "video": 1}

    @cached_property  # read once, not on every request's pixels
    def pixel_config(self) -> dict:
        """image_mean, image_std and the crop size of the base's image processor: in processor_config.json
        (transformers 5 saves the processors together) or preprocessor_config.json (older checkpoints)."""
        folder = Path(self.ctx.model_config.model)
        cfg = {}
        if (folder / "processor_config.json").exists():
            cfg = json.loads((folder / "processor_config.json").read_text()).get("image_processor") or {}
        if not cfg and (folder / "preprocessor_config.json").exists():
            cfg = json.loads((folder / "preprocessor_config.json").read_text())
        size = self.get_hf_config().vision_config.image_size
        crop = cfg.get("crop_size") or {}
        return {
            "size": int(crop.get("height", size)) if isinstance(crop, dict) else int(crop),
            "mean": cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
            "std": cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        }

    def tokens_per_frame(self) -> int:
        v = self.get_hf_config().vision_config
        return (v.image_size // v.patch_size) ** 2 + 1  # patches + CLS

    def num_image_tokens(self) -> int:
        return self.tokens_per_frame() - (self.get_hf_config().vision_feature_select_strategy == "default")

    def num_video_tokens(self, frames: int) -> int:
        return self.tokens_per_frame() * frames


class VideoLlavaDummyInputsBuilder(BaseDummyInputsBuilder[VideoLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        cfg, tok = self.info.get_hf_config(), self.info.get_tokenizer()
        image, video = tok.convert_ids_to_tokens([cfg.image_token_index, cfg.video_token_index])
        return image * mm_counts.get("image", 0) + video * mm_counts.get("video", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, BaseDummyOptions]
    ) -> MultiModalDataDict:
        size = self.info.get_hf_config().vision_config.image_size
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            ),
            "video": self._get_dummy_videos(
                width=size,
                height=size,
                num_frames=DUMMY_FRAMES,
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video"),
            ),
        }


class VideoLlavaMultiModalProcessor(BaseMultiModalProcessor[VideoLlavaProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        slot = int(hf_kwargs.get(PROJECTOR_KWARG, 0) or 0)
        px = self.info.pixel_config
        out = {}
        images = hf_data.get("images") or []
        if images:
            out["pixel_values"] = torch.from_numpy(
                np.concatenate(
                    [
                        clip_pixels(np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)[None], **px)
                        for img in images
                    ]
                )
            )
            out["image_projector"] = torch.full((len(images),), slot, dtype=torch.long)
        videos = hf_data.get("videos") or []
        if videos:
            clips = [v[0] if isinstance(v, tuple) else v for v in videos]  # (frames, metadata) or frames
            out["pixel_values_videos"] = torch.from_numpy(np.stack([clip_pixels(np.asarray(c), **px) for c in clips]))
            out["video_projector"] = torch.full((len(videos),), slot, dtype=torch.long)
        return BatchFeature(out)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "image_projector": MultiModalFieldConfig.batched("image"),
            "pixel_values_videos": MultiModalFieldConfig.batched("video"),
            "video_projector": MultiModalFieldConfig.batched("video"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        cfg = self.info.get_hf_config()

        def video_tokens(i: int) -> list[int]:
            frames = mm_items.get_items("video", VideoProcessorItems).get_num_frames(i)
            return [cfg.video_token_index] * self.info.num_video_tokens(frames)

        updates = []
        if "image" in mm_items:
            mm_items.get_items("image", ImageProcessorItems)
            updates.append(
                PromptReplacement(
                    modality="image",
                    target=[cfg.image_token_index],
                    replacement=[cfg.image_token_index] * self.info.num_image_tokens(),
                )
            )
        if "video" in mm_items:
            updates.append(
                PromptReplacement(modality="video", target=[cfg.video_token_index], replacement=video_tokens)
            )
        return updates


class Projector(nn.Module):
    """Video-LLaVA's multi_modal_projector: linear -> act -> linear."""

    def __init__(self, config: VideoLlavaConfig):
        super().__init__()
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if weights is None:
            return self.linear_2(self.act(self.linear_1(x)))
        h = nn.functional.linear(x, weights["linear_1.weight"], weights.get("linear_1.bias"))
        return nn.functional.linear(self.act(h), weights["linear_2.weight"], weights.get("linear_2.bias"))


@MULTIMODAL_REGISTRY.register_processor(
    VideoLlavaMultiModalProcessor, info=VideoLlavaProcessingInfo, dummy_inputs=VideoLlavaDummyInputsBuilder
)
class VideoLlavaForConditionalGeneration(nn.Module, SupportsLoRA, SupportsMultiModal):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",  # transformers >= 4.52 (ddft's bases)
            "model.image_tower.": "image_tower.",
            "model.video_tower.": "video_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )  # the original LanguageBind/Video-LLaVA-7B-hf layout (language_model.model.*, image_tower.*) is ours as is

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError(f"Video-LLaVA takes images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: VideoLlavaConfig = vllm_config.model_config.hf_config
        self.config = config
        quant = vllm_config.quant_config
        layers = _layers_to_feature(config)
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.image_tower = CLIPVisionModel(
                config.vision_config,
                quant,
                num_hidden_layers_override=layers,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "image_tower"),
            )
            self.video_tower = CLIPVisionModel(
                config.vision_config,
                quant,
                num_hidden_layers_override=layers,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "video_tower"),
            )
            self.multi_modal_projector = Projector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.projectors = Projectors(self.multi_modal_projector, PROJECTORS_ON_DEVICE)
        take_raw_logprobs_before_grammar()  # here: in the worker, whose runner samples (logprobs.py)

    # -- per-adapter projectors ------------------------------------------------------------------------
    def _project(self, features: torch.Tensor, slots: torch.Tensor | list) -> torch.Tensor:
        """features (items, tokens, vision hidden) through each item's projector."""
        slots = [int(s) for s in (slots.flatten().tolist() if isinstance(slots, torch.Tensor) else slots)]
        if not any(slots):
            return self.multi_modal_projector(features)
        out = None
        for slot in dict.fromkeys(slots):
            rows = [i for i, s in enumerate(slots) if s == slot]
            weights = self.projectors.get(slot) if slot else None
            if slot and weights is None:
                # The engine adds a slot before any request names it and drops it after the last, so
                # this is a bug of ours; raising here would end the engine core and every request.
                log.error("projector slot %d is not loaded: its items get the base's projector", slot)
            y = self.multi_modal_projector(features[rows], weights)
            out = y.new_empty((len(slots), *y.shape[1:])) if out is None else out
            out[rows] = y
        return out

    # -- multimodal embeddings ---------------------------------------------------------------------------
    @staticmethod
    def _stack(x) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.stack(list(x))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        embeddings: tuple[torch.Tensor, ...] = ()
        for key in kwargs:  # the order of the modalities as given
            if key == "pixel_values":
                pixels = self._stack(kwargs["pixel_values"]).to(self.image_tower.dtype)
                feats = self.image_tower(pixels, feature_select_strategy=self.config.vision_feature_select_strategy)
                embeddings += tuple(self._project(feats, kwargs.get("image_projector", [0] * len(pixels))))
            elif key == "pixel_values_videos":
                videos = self._stack(kwargs["pixel_values_videos"]).to(self.video_tower.dtype)
                n, frames = videos.shape[:2]
                feats = self.video_tower(videos.flatten(0, 1), feature_select_strategy="full")
                feats = feats.view(n, frames * feats.shape[1], feats.shape[2])
                embeddings += tuple(self._project(feats, kwargs.get("video_projector", [0] * n)))
        return embeddings

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def towers_as_vllm(named):  # transformers 5 saves a tower's CLIP without its `vision_model.` level
            for name, w in named:
                for tower in ("model.image_tower.", "model.video_tower.", "image_tower.", "video_tower."):
                    if name.startswith(tower) and not name.startswith(tower + "vision_model."):
                        name = tower + "vision_model." + name[len(tower) :]
                        break
                yield name, w

        return AutoWeightsLoader(self).load_weights(towers_as_vllm(weights), mapper=self.hf_to_vllm_mapper)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model",
            connector="multi_modal_projector",
            tower_model=["image_tower", "video_tower"],
        )
