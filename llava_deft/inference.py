"""Plain Python inference API.

    import llava_deft
    model = llava_deft.load_model("runs/easyvqa_tiny/final")
    model.generate("What shape is in the image?", images=["shape.png"])       # -> "circle"
    model.generate(["q1", "q2"], images=[["a.png"], ["b.png"]])               # batched, left-padded

A prompt without an ``<image>`` placeholder gets one per image, put before the text (LLaVA's
convention); a prompt that has placeholders must have exactly one per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .data import MultimodalCollator
from .errors import MediaFileError
from .model import LlavaDeftForCausalLM

ImageLike = str | Path | Image.Image


def _open(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    path = Path(img)
    if not path.is_file():
        raise MediaFileError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise MediaFileError(f"image '{path}' cannot be decoded: {e}") from None


class LlavaDeft:
    """A loaded model plus its tokenizer and image transform, ready to answer prompts."""

    def __init__(self, model: LlavaDeftForCausalLM, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.tokenizer = model.tokenizer
        self.collator = MultimodalCollator(
            model.tokenizer, model.image_transform, model.media_tokens_per_image, model.config.max_length,
            padding_side="left", generation=True, media_tokens_per_frame=model.media_tokens_per_frame,
        )

    def build_batch(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]]) -> dict:
        samples = []
        for i, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
            if "<image>" not in prompt and imgs:
                prompt = "<image>\n" * len(imgs) + prompt
            samples.append({"id": f"prompt {i}", "messages": [{"role": "user", "content": prompt}], "images": [_open(x) for x in imgs]})
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
    ) -> str | list[str]:
        """Answer one prompt (``images`` a list of images) or a batch (``images`` a list of lists)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if images is None:
            imgs = [[] for _ in prompts]
        elif single:
            imgs = [list(images)]
        else:
            imgs = [list(x) for x in images]
        if len(imgs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(imgs)} image lists; give one list per prompt")
        batch = self.build_batch(prompts, imgs)
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=gen,
        )
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return texts[0] if single else texts


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, pipeline=None) -> LlavaDeft:
    """Load a llava-deft model directory (``save_pretrained`` / a training export) for inference.

    ``pipeline`` optionally replaces the saved reduction pipeline (dict, list of stages or YAML path).
    """
    return LlavaDeft(LlavaDeftForCausalLM.from_pretrained(path, pipeline=pipeline), device, dtype)
