"""Datasets (easy-VQA, LLaVA conversation JSON) and the multimodal collator.

A sample is a plain dict::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "images": [PIL.Image (RGB), ...],
     "image_keys": [str, ...],                                  # optional, one per image
     "videos": [VideoClip | (T, H, W, 3) uint8 tensor, ...],    # optional
     "audios": [(S,) float waveform, mono, at the encoder's rate, ...],   # optional
     "texts": [str, ...]}                                       # optional: passages to reduce

with one placeholder in the text per media item of its kind (``<image>``, ``<video>``, ``<audio>``,
``<text>``), in order. ``MultimodalCollator`` turns a list of samples into padded tensors; labels come
from the chat template's assistant mask (never from re-tokenising with offsets, the cause of LLaVA's
"tokenization mismatch" zero losses).

``image_keys`` names each image for the collator's cache of transformed pixels: two images under one
key must be the same picture (``EasyVQADataset`` uses ``"easyvqa/{split}/{image_id}"``). Samples
without it have their images transformed on every call. The collator also memoises the tokenisation
of each distinct conversation; both caches are per process (each DataLoader worker holds its own).

    ds = EasyVQADataset("train", limit=8)
    batch = MultimodalCollator(load_tokenizer(), transform, media_tokens_per_image=16, max_length=256)(
        [ds[i] for i in range(4)])
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..encoders.audio import AudioProcessor
from ..errors import EmptyLabelsError, MediaCountMismatchError, SampleTooLongError
from ..model.splice import IGNORE_INDEX
from ..model.tokenizer import check_tokenizer, media_token_ids
from ..modality import MODALITIES, pad_sequences

__all__ = ["IGNORE_INDEX", "LRUCache", "MultimodalCollator", "build_collator", "build_generation_inputs", "pad_sequences"]


_MISSING = object()

ESCAPE = "\u200b"
"""ZERO WIDTH SPACE: put inside a special token's text or after a line-leading role word, it makes a
user's text tokenize as plain text (byte-level BPE gives it its own bytes) without a visible change."""

_ROLE_LINE = re.compile(r"(^|[\r\n])([ \t]*)(USER|ASSISTANT)(?=:)")
"""A role marker of the chat template (``USER:``, ``ASSISTANT:``, written as plain text) at the start
of a line of message content."""


class LRUCache:
    """A mapping of at most ``maxsize`` entries that forgets the least recently used one first, and
    counts ``hits`` and ``misses`` of ``get``. ``maxsize=0`` stores nothing (every lookup misses).
    """

    def __init__(self, maxsize: int):
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = int(maxsize)
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        return default

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
        self.hits = self.misses = 0


def _messages_key(messages: Sequence[dict[str, Any]]) -> Hashable | None:
    """A hashable key of a conversation (every field of every message, in order), or None when a value
    is unhashable (e.g. list-valued content parts): such samples are tokenised every time."""
    key = tuple(tuple(m.items()) for m in messages)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class MultimodalCollator:
    """Collate samples into model inputs.

    Training (``generation=False``, right padding): every sample needs an assistant turn; labels are
    ``input_ids`` where the chat template's assistant mask is 1 (the answer and its eos), else -100.
    Generation (``generation=True``, use ``padding_side="left"``): a trailing assistant turn is dropped
    (returned as ``references``), the prompt ends with the template's generation prompt, no labels.

    Per sample, refused with a typed error (never truncated): placeholders ≠ media of that kind
    (``MediaCountMismatchError``), no assistant token to learn from (``EmptyLabelsError``), an audio
    clip longer than the encoder's chunk, and more than ``max_length`` tokens once every placeholder
    becomes its media's tokens (``SampleTooLongError``): ``media_tokens_per_image`` per image,
    ``media_tokens_per_frame`` per video frame (what the model gives one frame after pooling; default
    ``media_tokens_per_image``), ``audio_processor.num_tokens(S)`` per clip of ``S`` samples and the
    passage's own length per text. An empty passage, or one holding a placeholder token, raises
    ``ValueError`` naming the sample.

    Message content (and a text passage) is text, never control: ``plain_text`` escapes it before the
    chat template runs. Any special token's text (``</s>``, ``<s>``, ``<pad>``, ``<unk>``, a real
    tokenizer's ``<|im_start|>``, ...) gets a zero-width space after its first character (``ESCAPE``),
    so it tokenizes as ordinary bytes and cannot end a turn or open one; a line-leading role marker
    (``USER:`` / ``ASSISTANT:``, which the tiny template writes as plain text) gets one before its colon,
    so content cannot fake a turn. Media placeholders are not escaped: they are how a prompt places its
    media, and one without its media item (``<image>`` typed with no image) is refused by the count
    check above. Chosen over ``split_special_tokens`` (it would split the template's own ``<s>`` /
    ``</s>`` too) and over refusing (users may quote markup); the assistant mask, and so the labels,
    of text without such markers is unchanged.

    Audio needs ``audio_processor`` (the model's ``audio_processor``, from its ``audio:`` config):
    waveforms become log-mel features here. Text passages are tokenised here (no special tokens); the
    model embeds them with the LLM's input embeddings and reduces them as TEXT rows.

    Returns ``input_ids (B, L)`` long, ``attention_mask (B, L)`` long, ``labels (B, L)`` long (training
    only), ``pixel_values (M, 3, H, W)`` float (images of the batch in sample order, ``None`` when
    M == 0), ``media_counts (B,)`` long images per sample, ``video_values (F, 3, H, W)`` float (every
    frame of every video, videos in sample order; ``None`` when there is no video), ``video_frames
    (V,)`` long frames per video, ``video_counts (B,)`` long videos per sample, ``ids`` list[str], and
    in generation ``references`` list[str | None]. Video frames go through ``image_transform`` one by
    one (``frames_to_pixels``) and are not cached. Audio: ``audio_values (A, n_mels, frames)`` float
    (clips in sample order, each padded to the chunk; ``None`` when there is none), ``audio_lengths
    (A,)`` long waveform samples per clip, ``audio_counts (B,)`` long clips per sample. Text:
    ``text_ids (P, L_t)`` long passages right-padded with the pad id (``None`` when there is none),
    ``text_lengths (P,)`` long tokens per passage, ``text_counts (B,)`` long passages per sample.

    Memoisation (per process, ``cache_size`` entries each, least recently used dropped first; 0
    disables): ``token_cache`` maps a conversation (its messages) to its (ids, labels, reference) as
    tuples, so ``apply_chat_template`` runs once per distinct conversation (easy-VQA's 38,575 train
    questions are 273 distinct conversations); the per-sample checks above still run on every call, so
    a bad sample raises each time it is collated, naming itself. ``image_cache`` maps a sample's
    ``image_keys`` entry to its transformed ``(3, H, W)`` tensor. Cached tensors never leave the
    collator: ``pixel_values`` is a fresh ``torch.stack`` of them, so callers may modify a batch in
    place. Caching assumes a deterministic ``image_transform`` (eval-style, as every registered
    encoder's is); pass ``cache_size=0`` for random augmentation. Memory: the image cache holds up to
    ``cache_size * 3 * H * W * 4`` bytes (64×64 easy-VQA: 48 KiB per image, 190 MiB for its 4,000
    train images) in each DataLoader worker.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        media_tokens_per_image: int,
        max_length: int,
        padding_side: str = "right",
        generation: bool = False,
        cache_size: int = 100_000,
        media_tokens_per_frame: int | None = None,
        audio_processor: AudioProcessor | None = None,
    ):
        check_tokenizer(tokenizer)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if media_tokens_per_image < 1 and image_transform is not None:  # 0 with no transform: a text-only model
            raise ValueError(f"media_tokens_per_image must be >= 1, got {media_tokens_per_image}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.media_tokens_per_image = int(media_tokens_per_image)
        if media_tokens_per_frame is not None and media_tokens_per_frame < 1 and image_transform is not None:
            raise ValueError(f"media_tokens_per_frame must be >= 1, got {media_tokens_per_frame}")
        self.media_tokens_per_frame = int(media_tokens_per_frame or media_tokens_per_image)
        self.audio_processor = audio_processor
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.generation = generation
        self.media_ids = media_token_ids(tokenizer)
        """Placeholder token id per modality the tokenizer has."""
        placeholders = {MODALITIES[k].placeholder for k in self.media_ids}
        specials = set(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        # a one-character special token cannot be split by an insertion: left alone (the tiny tokenizer has none)
        specials = sorted((t for t in specials - placeholders if len(t) > 1 and ESCAPE not in t), key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.token_cache = LRUCache(cache_size)
        self.image_cache = LRUCache(cache_size)

    def encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int] | None, str | None]:
        """Tokenise one sample: (input ids, labels or None in generation, reference answer or None).

        Fresh lists every call (the cache holds tuples); the media, length and label checks run on
        every call, cached or not.
        """
        ids, labels, reference, _ = self._encode(sample)
        return ids, labels, reference

    def _encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int] | None, str | None, dict[str, list]]:
        """``encode`` plus each modality's prepared items (``MediaKind.prepare``: pixels, frames,
        waveforms, passage ids)."""
        sample_id = str(sample["id"])
        if "messages" not in sample and "input_ids" in sample:  # a pre-tokenized LM block (TextCorpusDataset)
            return self._encode_block(sample, sample_id)
        ids, labels, reference = self._tokenize(sample["messages"])
        self._check_media(sample, sample_id, ids)
        prepared = {
            key: kind.prepare(self, list(sample.get(kind.sample_key) or []), sample, sample_id)
            for key, kind in MODALITIES.items()
        }
        n_items = sum(len(p) for p in prepared.values())
        media = sum(sum(MODALITIES[k].num_tokens(self, p)) for k, p in prepared.items())
        seen = len(ids) - n_items + media
        if seen > self.max_length:
            parts = [MODALITIES[k].describe(self, p) for k, p in prepared.items()]
            raise SampleTooLongError(
                f"sample {sample_id!r} is {seen} tokens long once {', '.join(parts[:-1])} and {parts[-1]} "
                f"({len(ids)} text ids), over max_length={self.max_length}; samples are refused, never cut "
                f"(raise max_length or drop the sample)"
            )
        if labels is None:
            return list(ids), None, reference, prepared
        if labels.count(IGNORE_INDEX) == len(labels):
            has_turn = any(m["role"] == "assistant" for m in sample["messages"])
            reason = (
                "the chat template marks no assistant tokens ({% generation %} block missing)"
                if has_turn
                else "it has no assistant turn"
            )
            raise EmptyLabelsError(sample_id, reason)
        return list(ids), list(labels), None, prepared

    def _encode_block(self, sample: dict[str, Any], sample_id: str):
        """A plain causal-LM sample ``{"id", "input_ids"}``: every id is supervised (labels = ids; the model
        shifts them); no chat template, no media."""
        ids = [int(t) for t in sample["input_ids"]]
        if not ids:
            raise ValueError(f"sample {sample_id!r} has no input_ids")
        if any(sample.get(kind.sample_key) for kind in MODALITIES.values()):
            raise ValueError(f"sample {sample_id!r} is a pre-tokenized LM block (input_ids, no messages) but carries "
                             f"media; media go with a conversation (messages with placeholders)")
        self._check_media(sample, sample_id, ids)  # a placeholder id in a block has no media to fill it
        if len(ids) > self.max_length:
            raise SampleTooLongError(f"sample {sample_id!r} is {len(ids)} tokens long, over max_length={self.max_length}; "
                                     f"samples are refused, never cut (build the blocks at most max_length long)")
        prepared = {key: [] for key in MODALITIES}
        return ids, (None if self.generation else list(ids)), None, prepared

    def plain_text(self, text: str) -> str:
        """``text`` with every special token but the media placeholders, and every line-leading role
        marker, escaped (see the class docstring): it tokenizes as plain text."""
        if self._specials is not None:
            n = 1
            while n:  # again: a token may start inside one just escaped; each pass only removes matches
                text, n = self._specials.subn(lambda m: m[0][0] + ESCAPE + m[0][1:], text)
        return _ROLE_LINE.sub(lambda m: m[1] + m[2] + m[3] + ESCAPE, text)

    def _tokenize(
        self, messages: Sequence[dict[str, Any]]
    ) -> tuple[tuple[int, ...], tuple[int, ...] | None, str | None]:
        """(ids, labels or None in generation, reference or None) of a conversation, memoised."""
        key = _messages_key(messages) if self.token_cache.maxsize else None
        if key is not None:
            hit = self.token_cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
        messages = list(messages)
        reference = None
        if self.generation and messages and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        messages = [dict(m, content=self.plain_text(m["content"])) if isinstance(m.get("content"), str) else m
                    for m in messages]
        if self.generation:
            enc = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=True
            )
            labels = None
        else:
            enc = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            labels = tuple(t if a else IGNORE_INDEX for t, a in zip(enc["input_ids"], enc["assistant_masks"]))
        out = (tuple(enc["input_ids"]), labels, reference)
        if key is not None:
            self.token_cache.put(key, out)
        return out

    def _check_media(self, sample: dict[str, Any], sample_id: str, ids: Sequence[int]) -> None:
        for key, kind in MODALITIES.items():
            if sample.get(kind.sample_key) and key not in self.media_ids:
                raise ValueError(
                    f"sample {sample_id!r} has {key} media but the tokenizer has no {kind.placeholder} "
                    f"token; add it as a special token (tokenizer.add_special_tokens) and resize the LLM's embeddings"
                )
        for key, token_id in self.media_ids.items():
            kind = MODALITIES[key]
            n_placeholders = ids.count(token_id)
            n_media = len(sample.get(kind.sample_key) or [])
            if n_placeholders != n_media:
                raise MediaCountMismatchError(sample_id, kind.placeholder, n_placeholders, n_media)

    def pixels(self, sample: dict[str, Any]) -> list[torch.Tensor]:
        """The transformed ``(3, H, W)`` images of one sample, from ``image_cache`` where keyed."""
        images = sample.get("images") or []
        keys = sample.get("image_keys")
        if keys is None:
            return [self.image_transform(img) for img in images]
        if len(keys) != len(images) or not all(isinstance(k, str) for k in keys):
            raise ValueError(
                f"sample {str(sample['id'])!r} has image_keys {list(keys)!r} for {len(images)} image(s); "
                f"give one string key per image"
            )
        if not self.image_cache.maxsize:
            return [self.image_transform(img) for img in images]
        out = []
        for key, img in zip(keys, images):
            pixels = self.image_cache.get(key, _MISSING)
            if pixels is _MISSING:
                # own the storage: a transform may return a view of a buffer it reuses or of a bigger array
                pixels = self.image_transform(img).detach().clone()
                self.image_cache.put(key, pixels)
            out.append(pixels)
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        encoded = [self._encode(s) for s in samples]
        input_ids, attention_mask = pad_sequences(
            [ids for ids, _, _, _ in encoded], self.tokenizer.pad_token_id, self.padding_side
        )
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key, kind in MODALITIES.items():
            batch.update(kind.stack(self, list(samples), [prep[key] for _, _, _, prep in encoded]))
        batch["ids"] = [str(s["id"]) for s in samples]
        if self.generation:
            batch["references"] = [ref for _, _, ref, _ in encoded]
        else:
            batch["labels"], _ = pad_sequences(
                [labels for _, labels, _, _ in encoded], IGNORE_INDEX, self.padding_side
            )
        return batch


def build_collator(
    processors, *, generation: bool = False, padding_side: str | None = None, cache_size: int = 100_000
) -> MultimodalCollator:
    """THE collator of a model (``processors``: ``model.processors`` or the second value of
    ``create_model_and_processors``), for training (``generation=False``: right padding, labels) or
    for generation (left padding, references). Training, inference and every eval script build their
    collator here, so each sees the same token counts, transforms and audio features."""
    return MultimodalCollator(
        processors.tokenizer, processors.image_transform, processors.media_tokens_per_image, processors.max_length,
        padding_side=padding_side or ("left" if generation else "right"), generation=generation,
        cache_size=cache_size, media_tokens_per_frame=processors.media_tokens_per_frame,
        audio_processor=processors.audio_processor,
    )


def build_generation_inputs(
    collator: MultimodalCollator,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    system: str | None = None,
) -> dict[str, Any]:
    """A generation batch (``collator`` built with ``generation=True``, left padding) for user
    ``prompts``, each with one ``<image>`` per image in ``images[i]``; ids ``prompt-{i}``."""
    if len(prompts) != len(images):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt"
        )
    prefix = [{"role": "system", "content": system}] if system is not None else []
    samples = [
        {"id": f"prompt-{i}", "messages": prefix + [{"role": "user", "content": p}], "images": list(imgs)}
        for i, (p, imgs) in enumerate(zip(prompts, images))
    ]
    return collator(samples)
