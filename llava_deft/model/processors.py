"""What feeds a model: its processors (``create_model_and_processors`` in ``llava.py`` returns both, as
``open_clip.create_model_and_transforms`` does).

    model, processors = create_model_and_processors("configs/model/tiny.yaml")   # or a dict / None
    collate = llava_deft.data.build_collator(processors)                        # training batches

``Processors`` is everything a collator or a dataset needs of a model and nothing it must not hold
(no weights: small and picklable, so DataLoader workers can hold it): the tokenizer, the image
transform, how many tokens an image / a video frame gives the LLM, the audio feature extractor, the
longest sample, and how media files are read (frame sampling, audio rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config.model import ModelConfig
from ..encoders.audio import AudioProcessor
from ..modality import MediaOptions


@dataclass(frozen=True)
class Processors:
    tokenizer: Any
    image_transform: Callable
    media_tokens_per_image: int
    media_tokens_per_frame: int
    max_length: int
    audio_processor: AudioProcessor | None
    media: MediaOptions
    """How files are read: video frame sampling and the audio rate (``MediaKind.load``)."""

    @classmethod
    def of(cls, model) -> "Processors":
        """The processors of a built ``LlavaDeftForCausalLM``."""
        cfg = model.config
        return cls(
            tokenizer=model.tokenizer,
            image_transform=model.image_transform,
            media_tokens_per_image=model.media_tokens_per_image,
            media_tokens_per_frame=model.media_tokens_per_frame,
            max_length=cfg.max_length,
            audio_processor=model.audio_processor,
            media=media_options(cfg),
        )


def media_options(cfg: ModelConfig) -> MediaOptions:
    """How a model with config ``cfg`` reads media files."""
    return MediaOptions(**cfg.video.sampling(), sampling_rate=cfg.audio.sampling_rate(), limits=cfg.limits)
