"""Plain Python inference API.

    import llava_deft
    model = llava_deft.load_model("runs/easyvqa_tiny/final")
    model.generate("What shape is in the image?", images=["shape.png"])       # -> "circle"
    model.generate(["q1", "q2"], images=[["a.png"], ["b.png"]])               # batched, left-padded
    model.generate("Which way does it move?", videos=["clip.mp4"])
    model.generate("What number is said?", audios=["seven.wav"])               # needs audio.enabled
    model.generate("What is the pass key?", texts=["... The pass key is 48213. ..."])

A prompt without a placeholder of a kind gets one per media item of that kind, put before the text
(LLaVA's convention; ``<image>``, ``<video>``, ``<audio>``, ``<text>`` in that order); a prompt that has
placeholders of a kind must have exactly one per item of that kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .data.collate import build_collator
from .encoders.video import VideoClip
from .model.llava import LlavaDeftForCausalLM
from .modality import MODALITIES

ImageLike = str | Path | Image.Image
VideoLike = str | Path | VideoClip | torch.Tensor
"""A video file, a ``VideoClip``, or ``(T, H, W, 3)`` uint8 frames."""
AudioLike = str | Path | torch.Tensor | np.ndarray
"""An audio file, or an ``(S,)`` mono waveform at the model's audio rate."""


class LlavaDeft:
    """A loaded model plus its tokenizer and processors, ready to answer prompts."""

    def __init__(self, model: LlavaDeftForCausalLM, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.tokenizer = model.tokenizer
        self.processors = model.processors
        self.collator = build_collator(self.processors, generation=True)

    def build_batch(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageLike]] | None = None,
        videos: Sequence[Sequence[VideoLike]] | None = None,
        audios: Sequence[Sequence[AudioLike]] | None = None,
        texts: Sequence[Sequence[str]] | None = None,
    ) -> dict:
        """Left-padded generation batch: one list of media per prompt for each kind given."""
        media = {"image": images, "video": videos, "audio": audios, "text": texts}
        samples = []
        for i, prompt in enumerate(prompts):
            sample: dict[str, Any] = {"id": f"prompt {i}"}
            prefix = ""
            for key, kind in MODALITIES.items():
                per_prompt = media[key]
                items = [kind.load(x, self.processors.media) for x in (per_prompt[i] if per_prompt is not None else [])]
                if items and kind.placeholder not in prompt:
                    prefix += f"{kind.placeholder}\n" * len(items)
                sample[kind.sample_key] = items
            sample["messages"] = [{"role": "user", "content": prefix + prompt}]
            samples.append(sample)
        batch = self.collator(samples)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        videos: Sequence[VideoLike] | Sequence[Sequence[VideoLike]] | None = None,
        audios: Sequence[AudioLike] | Sequence[Sequence[AudioLike]] | None = None,
        texts: Sequence[str] | Sequence[Sequence[str]] | None = None,
    ) -> str | list[str]:
        """Answer one prompt (each media argument a list of items) or a batch (each a list of lists,
        one per prompt). ``texts`` are passages routed through the reduction pipeline at ``<text>``."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        per_prompt = {}
        given_by_kind = {"image": images, "video": videos, "audio": audios, "text": texts}
        for name, given in ((key, given_by_kind[key]) for key in MODALITIES):
            if given is None:
                continue
            if isinstance(given, (str, Path)) or (not single and any(isinstance(x, (str, Path)) for x in given)):
                shape = f"{name}s=[...]" if single else f"{name}s=[[...], ...] (one list per prompt)"
                raise TypeError(f"{name}s must be a list of lists per prompt or of items, not a bare string; give {shape}")
            lists = [list(given)] if single else [list(x) for x in given]
            if len(lists) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(lists)} {name} lists; give one list per prompt")
            per_prompt[f"{name}s"] = lists
        batch = self.build_batch(prompts, **per_prompt)
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=gen,
        )
        texts_out = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return texts_out[0] if single else texts_out


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, pipeline=None) -> LlavaDeft:
    """Load a llava-deft model directory (``save_pretrained`` / a training export) for inference.

    ``pipeline`` optionally replaces the saved reduction pipeline (dict, list of stages or YAML path).
    """
    return LlavaDeft(LlavaDeftForCausalLM.from_pretrained(path, pipeline=pipeline), device, dtype)
