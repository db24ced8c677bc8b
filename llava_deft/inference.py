"""Plain Python inference API.

    import llava_deft
    model = llava_deft.load_model("runs/easyvqa_tiny/final")
    model.generate("What shape is in the image?", images=["shape.png"])       # -> "circle"
    model.generate(["q1", "q2"], images=[["a.png"], ["b.png"]])               # batched, left-padded
    model.generate("Which way does it move?", videos=["clip.mp4"])
    model.generate("What number is said?", audios=["seven.wav"])               # needs audio.enabled
    model.generate("What is the pass key?", texts=["... The pass key is 48213. ..."])
    model.generate("q", images=[np_array], system="Answer in one word.", retention=0.25, return_stats=True)
    model.chat([{"role": "user", "content": "what shape?"}, {"role": "assistant", "content": "circle"},
                {"role": "user", "content": "what color?"}], images=["shape.png"])
    for piece in model.stream("describe it", images=["shape.png"]): print(piece, end="", flush=True)
    model.kept_tokens_overlay("shape.png", "what shape?", pipeline="configs/pipeline/deft.yaml", retention=0.25)
    with model.reduction(pipeline="configs/pipeline/random.yaml", retention=0.11):     # several calls
        model.generate("q", images=["shape.png"])

A prompt without a placeholder of a kind gets one per media item of that kind, put before the text
(LLaVA's convention; ``<image>``, ``<video>``, ``<audio>``, ``<text>`` in that order; in a conversation,
before the first user turn's text); a prompt that has placeholders of a kind must have exactly one per
item of that kind.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import TextIteratorStreamer

from pipeline import Pipeline, build_pipeline, validate_config

from .data.collate import build_collator
from .encoders.video import VideoClip
from .errors import InvalidArgumentError, UnsupportedInputError
from .model.llava import GenerationInfo, LlavaDeftForCausalLM, MediaReduction
from .modality import MODALITIES, video_frames
from .overlay import encoder_view, kept_tokens_panel, side_by_side

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
"""An image file, a PIL image, or pixels: see ``IMAGE_FORMS``."""
VideoLike = str | Path | VideoClip | torch.Tensor
"""A video file, a ``VideoClip``, or ``(T, H, W, 3)`` uint8 frames."""
AudioLike = str | Path | torch.Tensor | np.ndarray
"""An audio file, or an ``(S,)`` mono waveform at the model's audio rate."""
Messages = Sequence[dict[str, str]]
"""A conversation: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""

IMAGE_FORMS = (
    "a file path, a PIL image, a numpy array or torch tensor of shape (H, W) (gray) or (H, W, 3), or a torch "
    "tensor of shape (3, H, W) (a tensor whose first dimension is 3 is read so); uint8, or float in [0, 1]"
)
"""What ``images=`` items may be."""
ROLES = ("system", "user", "assistant")
PIPELINE_SEED = 0
"""Seed of the init of per-call pipeline stages the checkpoint has no weights for (``LlavaDeft.reduction``)."""


def as_image(item: Any, name: str = "image") -> str | Path | Image.Image:
    """An image given to the API -> a path (read by the image kind's loader) or an RGB PIL image.

    ``name`` (e.g. ``images[1]``) names the item in errors: ``UnsupportedInputError`` for a type, shape or
    dtype not in ``IMAGE_FORMS``, ``InvalidArgumentError`` for float pixels outside [0, 1].
    """
    if isinstance(item, (str, Path)):
        return item
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if not isinstance(item, (np.ndarray, torch.Tensor)):
        raise UnsupportedInputError(f"{name} is a {type(item).__name__}; an image is {IMAGE_FORMS}")
    shape = tuple(item.shape)
    if isinstance(item, np.ndarray):
        if item.dtype.kind not in "uif":
            raise UnsupportedInputError(f"{name} has dtype {item.dtype}; an image is {IMAGE_FORMS}")
        pixels = torch.from_numpy(np.ascontiguousarray(item))
    else:
        pixels = item.detach().cpu()
        if pixels.ndim == 3 and pixels.shape[0] == 3:
            pixels = pixels.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)) or 0 in shape:
        raise UnsupportedInputError(f"{name} has shape {shape}; an image is {IMAGE_FORMS}")
    if pixels.is_floating_point():
        if not bool(torch.isfinite(pixels).all()) or bool(pixels.min() < 0) or bool(pixels.max() > 1):
            raise InvalidArgumentError(
                f"{name} is a float image with values outside [0, 1] (min {float(pixels.min()):g}, max "
                f"{float(pixels.max()):g}); scale it to [0, 1] or give uint8 pixels"
            )
        pixels = (pixels * 255).round().to(torch.uint8)
    elif pixels.dtype != torch.uint8:
        raise UnsupportedInputError(f"{name} has dtype {pixels.dtype}; an image is {IMAGE_FORMS}")
    return Image.fromarray(pixels.numpy()).convert("RGB")


def check_messages(messages: Messages, system: str | None = None) -> list[dict[str, str]]:
    """A copy of a conversation for ``chat``: every message a ``{"role", "content"}`` dict, a system
    message only first (and not together with ``system=``), the last message the user's."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UnsupportedInputError(
            f"messages must be a non-empty list of {{'role': ..., 'content': str}} dicts, got {type(messages).__name__}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UnsupportedInputError(
                f"messages[{i}] = {m!r}: give a dict with 'role' one of {list(ROLES)} and 'content' a string"
            )
        if m["role"] == "system" and (i > 0 or system is not None):
            where = "besides system=" if system is not None else f"at messages[{i}]"
            raise InvalidArgumentError(f"a system message {where}: give one system prompt, first (or as system=)")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InvalidArgumentError(
            f"messages[{len(out) - 1}] is a {out[-1]['role']!r} turn; chat answers the last user turn, so end "
            f"messages with {{'role': 'user', 'content': ...}}"
        )
    return out


def check_retention(retention: float | None) -> None:
    if retention is None:
        return
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0 < retention <= 1:
        raise InvalidArgumentError(
            f"retention={retention!r} is out of range: give the fraction of media tokens to keep, in (0, 1]"
        )


def reducing_stages(reduction: MediaReduction) -> list[tuple[str, list[int]]]:
    """The ``(stage, kept indices)`` of the stages that changed the kept tokens of ``reduction``; when
    none did, one entry for the whole pipeline (every token kept)."""
    steps, before = [], list(range(reduction.total))
    for name, kept in reduction.stages:
        if kept != before:
            steps.append((name, kept))
        before = kept
    return steps or [("+".join(name for name, _ in reduction.stages) or "no stages", reduction.kept)]


class _Cancelled(Exception):
    """Raised inside the generation thread when the reader of a ``TextStream`` stopped early."""


class _CancellableStreamer(TextIteratorStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.cancelled = False

    def put(self, value):
        if self.cancelled:
            raise _Cancelled
        super().put(value)


class TextStream:
    """The text pieces of one answer as its tokens are generated (``LlavaDeft.stream``).

    Generation runs in a thread feeding a ``transformers.TextIteratorStreamer`` (the ``put`` / ``end``
    protocol); the pieces join to exactly what ``generate`` returns for the same call (leading and
    trailing whitespace are held back the way ``generate`` strips them). ``info`` is the call's
    :class:`~llava_deft.model.llava.GenerationInfo` once the iteration ended. An error of the generation
    is raised by the iteration; leaving it early (``break``, ``close()``) stops generating at the next token.
    """

    def __init__(self, run: Callable[[Any], GenerationInfo], tokenizer):
        self.info: GenerationInfo | None = None
        self._streamer = _CancellableStreamer(tokenizer)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(run,), daemon=True)
        self._pieces = self._generate()

    def _run(self, run) -> None:
        try:
            self.info = run(self._streamer)
        except _Cancelled:
            pass
        except BaseException as err:  # handed to the reader, which raises it
            self._error = err
            self._streamer.end()

    def _generate(self) -> Iterator[str]:
        self._thread.start()
        held, started = "", False
        try:
            for piece in self._streamer:
                text = held + piece
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                body = text.rstrip()
                held = text[len(body):]
                if body:
                    yield body
        finally:
            self._streamer.cancelled = True
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (at the next token) and wait for the thread."""
        self._pieces.close()


class LlavaDeft:
    """A loaded model plus its tokenizer and processors, ready to answer prompts.

    ``device``: a torch device string or object (default ``cuda`` where available, else ``cpu``).
    ``compile``: decode through ``torch.compile`` (the LLM's prefill and step fused by inductor and replayed
    from CUDA graphs; the first answer of a batch size compiles, later ones are faster: see
    ``LlavaDeftForCausalLM.generate``).
    """

    def __init__(self, model: LlavaDeftForCausalLM, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 compile: bool | str = False):
        from .model.llm.decoder import check_compile

        check_compile(compile)  # before the model moves anywhere
        try:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError) as err:
            raise InvalidArgumentError(f"device={device!r} is not a torch device; give e.g. 'cpu', 'cuda' or 'cuda:0'") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(f"device={str(device)!r}: CUDA is not available on this machine; use 'cpu'")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.compile = compile
        self.tokenizer = model.tokenizer
        self.processors = model.processors
        self.collator = build_collator(self.processors, generation=True)
        self._pipelines: dict[str, Pipeline] = {}
        """Alternative pipelines built for ``reduction(pipeline=...)``, by their validated config."""

    # ------------------------------------------------------------------ inputs
    def _media_lists(self, given_by_kind: dict[str, Any], n_prompts: int, single: bool) -> dict[str, list[list]]:
        """Per kind given, one list of items per prompt (``single``: the argument is that one prompt's
        list); images converted by ``as_image``."""
        per_prompt = {}
        for name in MODALITIES:
            given = given_by_kind.get(name)
            if given is None:
                continue
            lists = [given] if single else given
            shape = f"{name}s=[...]" if single else f"{name}s=[[...], ...] (one list per prompt)"
            if not isinstance(lists, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in lists):
                bad = given if single or not isinstance(given, (list, tuple)) else next(
                    x for x in given if not isinstance(x, (list, tuple)))
                what = "string" if isinstance(bad, (str, Path)) else type(bad).__name__
                raise UnsupportedInputError(
                    f"{name}s must be a list of lists per prompt or of items, not a bare {what}; give {shape}"
                )
            if len(lists) != n_prompts:
                raise InvalidArgumentError(f"{n_prompts} prompts but {len(lists)} {name} lists; give one list per prompt")
            lists = [list(x) for x in lists]
            if name == "image":
                at = (lambda i, j: f"images[{j}]") if single else (lambda i, j: f"images[{i}][{j}]")
                lists = [[as_image(x, at(i, j)) for j, x in enumerate(items)] for i, items in enumerate(lists)]
            per_prompt[name] = lists
        return per_prompt

    def _collate(self, conversations: list[list[dict[str, str]]], media: dict[str, list[list]],
                 system: str | None = None) -> dict:
        """Left-padded generation batch of conversations (``media``: kind -> one list of items per
        conversation); placeholders missing from a conversation go before its first user turn's text."""
        if system is not None and not isinstance(system, str):
            raise UnsupportedInputError(f"system must be a string (the system prompt), got {type(system).__name__}")
        samples = []
        for i, conversation in enumerate(conversations):
            messages = [dict(m) for m in conversation]
            sample: dict[str, Any] = {"id": f"prompt {i}"}
            prefix = ""
            for key, kind in MODALITIES.items():
                items = [kind.load(x, self.processors.media) for x in (media[key][i] if key in media else [])]
                if items and not any(kind.placeholder in m["content"] for m in messages):
                    prefix += f"{kind.placeholder}\n" * len(items)
                sample[kind.sample_key] = items
            first_user = next(j for j, m in enumerate(messages) if m["role"] == "user")
            messages[first_user]["content"] = prefix + messages[first_user]["content"]
            sample["messages"] = ([{"role": "system", "content": system}] if system is not None else []) + messages
            samples.append(sample)
        batch = self.collator(samples)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def build_batch(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageLike]] | None = None,
        videos: Sequence[Sequence[VideoLike]] | None = None,
        audios: Sequence[Sequence[AudioLike]] | None = None,
        texts: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
    ) -> dict:
        """Left-padded generation batch: one list of media per prompt for each kind given."""
        prompts = _prompts(prompts)
        media = self._media_lists({"image": images, "video": videos, "audio": audios, "text": texts}, len(prompts), False)
        return self._collate([[{"role": "user", "content": p}] for p in prompts], media, system)

    # ------------------------------------------------------------------ reduction per call
    def _pipeline(self, spec: str | Path | dict | list) -> Pipeline:
        """The pipeline of config ``spec`` (YAML path, dict or list of stages), built once per distinct
        validated config. Each of its stages that the model's own pipeline also has (same name, same
        occurrence of that name, identical parameter names and shapes) starts from the model's weights;
        the others keep their init, drawn from seed ``PIPELINE_SEED`` (the same in every process, without
        touching the global random state)."""
        cfg = validate_config(spec)
        key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        own = self.model.pipeline
        if own.config is not None and json.dumps(own.config.model_dump(mode="json"), sort_keys=True) == key:
            return own
        if key not in self._pipelines:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(PIPELINE_SEED)
                pipe = build_pipeline(cfg, dim=self.model.llm.hidden_size)
            _carry_stage_weights(own, pipe)
            self._pipelines[key] = pipe.to(device=self.device, dtype=self.model.projector_dtype()).eval()
        return self._pipelines[key]

    @contextmanager
    def reduction(self, pipeline: str | Path | dict | list | None = None, retention: float | None = None) -> Iterator[Pipeline]:
        """Run the block with another reduction pipeline (``pipeline``: YAML path, dict or list of stages;
        None: the model's own) and/or ``retention`` (every stage's ``retention_ratio``, in (0, 1]); the
        model's own pipeline and ratios are back afterwards, also after an error. Yields the pipeline in use.

        Not thread-safe: one reduction per model at a time.
        """
        check_retention(retention)
        pipe = self._pipeline(pipeline) if pipeline is not None else self.model.pipeline
        ratios = [(s, s.retention_ratio) for s in pipe.stages if hasattr(s, "retention_ratio")]
        config = pipe.config
        if retention is not None and not ratios:
            raise InvalidArgumentError(
                f"retention={retention!r} cannot apply: no stage of the pipeline {pipe.names} has a retention_ratio; "
                f"give a pipeline with a reducer (e.g. pipeline='configs/pipeline/deft.yaml')"
            )
        saved = self.model.pipeline
        try:
            if retention is not None:
                pipe.set_retention(float(retention))
            self.model.pipeline = pipe
            yield pipe
        finally:
            self.model.pipeline = saved
            for stage, ratio in ratios:
                stage.retention_ratio = ratio
            pipe.config = config

    # ------------------------------------------------------------------ generation
    def _answer(self, batch: dict, *, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None, pipeline=None,
                retention: float | None = None, streamer=None,
                with_info: bool = True) -> tuple[list[str], GenerationInfo | None]:
        """Generate for a collated batch under ``reduction(pipeline, retention)``: (texts, info). Without
        ``with_info`` info is None and the pipeline may replay from a CUDA graph (recording what each stage
        kept needs its eager calls)."""
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        with torch.no_grad(), self.reduction(pipeline, retention):
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=gen, streamer=streamer, return_info=with_info,
                compile=self.compile,
            )
        out, info = out if with_info else (out, None)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)], info

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
        *,
        system: str | None = None,
        pipeline: str | Path | dict | list | None = None,
        retention: float | None = None,
        return_stats: bool = False,
    ) -> str | list[str] | tuple[str | list[str], GenerationInfo]:
        """Answer one prompt (each media argument a list of items) or a batch (each a list of lists,
        one per prompt). ``texts`` are passages routed through the reduction pipeline at ``<text>``.

        ``system``: a system prompt before every prompt. ``pipeline`` / ``retention``: this call only
        (see :meth:`reduction`). ``max_new_tokens`` >= 1, and the prompt (its unreduced length) plus
        ``max_new_tokens`` must fit the LLM's ``max_position_embeddings`` (``ContextLengthError``).
        ``return_stats``: also return a :class:`~llava_deft.model.llava.GenerationInfo` (per-stage
        statistics; per prompt and media item the kept token indices and the original count).
        """
        single = isinstance(prompt, str)
        prompts = _prompts(prompt)
        given = {"image": images, "video": videos, "audio": audios, "text": texts}
        batch = self._collate([[{"role": "user", "content": p}] for p in prompts],
                              self._media_lists(given, len(prompts), single), system)
        answers, info = self._answer(batch, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, pipeline=pipeline, retention=retention,
                                     with_info=return_stats)
        out = answers[0] if single else answers
        return (out, info) if return_stats else out

    def chat(
        self,
        messages: Messages,
        images: Sequence[ImageLike] | None = None,
        videos: Sequence[VideoLike] | None = None,
        audios: Sequence[AudioLike] | None = None,
        texts: Sequence[str] | None = None,
        *,
        system: str | None = None,
        return_stats: bool = False,
        **options,
    ) -> str | tuple[str, GenerationInfo]:
        """Answer the last user turn of one conversation (``messages``: system / user / assistant turns
        through the tokenizer's chat template, the generation prompt at the end). Media placeholders
        missing from the conversation go before the first user turn's text. ``options``: ``generate``'s
        keywords (``max_new_tokens``, sampling, ``seed``, ``pipeline``, ``retention``)."""
        conversation = check_messages(messages, system)
        given = {"image": images, "video": videos, "audio": audios, "text": texts}
        batch = self._collate([conversation], self._media_lists(given, 1, True), system)
        answers, info = self._answer(batch, with_info=return_stats, **options)
        return (answers[0], info) if return_stats else answers[0]

    def stream(
        self,
        prompt: str | Messages,
        images: Sequence[ImageLike] | None = None,
        videos: Sequence[VideoLike] | None = None,
        audios: Sequence[AudioLike] | None = None,
        texts: Sequence[str] | None = None,
        *,
        system: str | None = None,
        **options,
    ) -> TextStream:
        """Like ``generate`` (a prompt string) or ``chat`` (a list of messages), for ONE prompt, as a
        :class:`TextStream` of text pieces while the tokens come; ``"".join(stream)`` is ``generate``'s
        text. Inputs are checked and collated here; generation starts with the iteration."""
        if isinstance(prompt, str):
            conversation = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            raise InvalidArgumentError(
                f"stream takes one prompt (batch size 1), got {len(prompt)} prompts; stream them one by one or "
                f"use generate for a batch"
            )
        else:
            conversation = check_messages(prompt, system)
        given = {"image": images, "video": videos, "audio": audios, "text": texts}
        batch = self._collate([conversation], self._media_lists(given, 1, True), system)
        return TextStream(lambda streamer: self._answer(batch, streamer=streamer, **options)[1], self.tokenizer)

    # ------------------------------------------------------------------ overlay
    def kept_tokens_overlay(
        self,
        image: ImageLike | None = None,
        prompt: str = "",
        *,
        video: VideoLike | None = None,
        pipeline: str | Path | dict | list | None = None,
        retention: float | None = None,
        system: str | None = None,
        scale: int | None = None,
    ) -> Image.Image:
        """The ``image`` (or ``video``: a row of frames) as the encoder sees it with the tokens the
        pipeline kept drawn over their patch cells, the pruned cells dimmed; one panel per stage that
        changed the kept tokens, titled ``stage: kept/total`` (see ``llava_deft.overlay``). Runs the
        pipeline (and one decoding step) on ``prompt`` with that media item alone."""
        if (image is None) == (video is None):
            raise InvalidArgumentError("kept_tokens_overlay draws one media item: give image= or video= (not both)")
        kind = "image" if image is not None else "video"
        media = self._media_lists({kind: [image if video is None else video]}, 1, True)
        batch = self._collate([[{"role": "user", "content": prompt}]], media, system)
        _, info = self._answer(batch, max_new_tokens=1, pipeline=pipeline, retention=retention)
        return self.draw_reduction(media[kind][0][0], info.media[0][0], scale)

    def draw_reduction(self, item: ImageLike | VideoLike, reduction: MediaReduction, scale: int | None = None) -> Image.Image:
        """The overlay of ``reduction`` (an entry of ``GenerationInfo.media``) on its media ``item`` (what was
        passed as that image or video). ``scale``: pixels per encoder pixel (default: panels >= 256 px)."""
        opts = self.processors.media
        if reduction.kind == "image":
            frames, grid = [MODALITIES["image"].load(as_image(item, "image"), opts)], self.model.vision.grid
        elif reduction.kind == "video":
            clip = video_frames(MODALITIES["video"].load(item, opts)).cpu().numpy()  # (T, H, W, 3) uint8
            frames, grid = [Image.fromarray(f) for f in clip], self.model.video_grid
        else:
            raise InvalidArgumentError(f"an overlay draws images and videos, not a {MODALITIES[reduction.kind].noun}")
        views = [encoder_view(self.processors.image_transform, f) for f in frames]
        if scale is None:
            scale = max(1, 256 // max(views[0].size))
        panels = [kept_tokens_panel(views, grid, f"{name}: {len(kept)}/{reduction.total}", kept, scale)
                  for name, kept in reducing_stages(reduction)]
        return side_by_side(panels, vertical=reduction.kind == "video")


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UnsupportedInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    return prompts


def _carry_stage_weights(source: Pipeline, target: Pipeline) -> None:
    """Load into each stage of ``target`` the weights of the stage of ``source`` with the same name and
    occurrence of that name, when their parameter names and shapes all agree (else it keeps its init)."""
    def by_name(pipe: Pipeline) -> dict[tuple[str, int], torch.nn.Module]:
        seen: dict[str, int] = {}
        out = {}
        for stage in pipe.stages:
            out[(stage.stage_name, seen.get(stage.stage_name, 0))] = stage
            seen[stage.stage_name] = seen.get(stage.stage_name, 0) + 1
        return out

    sources = by_name(source)
    for key, stage in by_name(target).items():
        if key not in sources:
            continue
        state, own = sources[key].state_dict(), stage.state_dict()
        if state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
            stage.load_state_dict(state)


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, pipeline=None,
               compile: bool | str = False) -> LlavaDeft:
    """Load a llava-deft model directory (``save_pretrained`` / a training export) for inference.

    ``pipeline`` optionally replaces the saved reduction pipeline (dict, list of stages or YAML path);
    ``compile``: see :class:`LlavaDeft`.
    """
    return LlavaDeft(LlavaDeftForCausalLM.from_pretrained(path, pipeline=pipeline), device, dtype, compile=compile)
