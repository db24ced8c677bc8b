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

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import easy_vqa
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava_deft.audio import SAMPLING_RATE, AudioProcessor, load_audio
from llava_deft.errors import (
    AudioError,
    DatasetFormatError,
    EmptyLabelsError,
    MediaCountMismatchError,
    MediaFileError,
    SampleTooLongError,
    VideoError,
)
from llava_deft.tokenizer import MEDIA_TOKENS, check_tokenizer, media_token_ids
from llava_deft.video import VideoClip, frames_to_pixels, load_video

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (prompt, placeholders, padding)."""

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""LLaVA JSON ``from`` value → chat-template role."""

MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios", "text": "texts"}
"""Modality → the sample key holding its media list."""

EASYVQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})
"""The shape words among easy-VQA's answers; the other non yes/no answers are colours."""


def _load_rgb(path: Path) -> Image.Image:
    """Decode an image file fully (so decoding errors surface here) as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


# --------------------------------------------------------------------------------------------- easy-VQA


def easyvqa_question_types(answers: Sequence[str]) -> dict[str, str]:
    """Map each answer of the easy-VQA vocabulary to its question type: "yes/no", "shape" or "color"."""
    types = {}
    for answer in answers:
        if answer in ("yes", "no"):
            types[answer] = "yes/no"
        elif answer in EASYVQA_SHAPES:
            types[answer] = "shape"
        else:
            types[answer] = "color"
    return types


def _easyvqa_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    return list(questions), list(answers), [int(i) for i in image_ids], dict(paths)


def _easyvqa_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{MEDIA_TOKENS['image']}\n{question}"},
        {"role": "assistant", "content": answer},
    ]


class EasyVQADataset(Dataset):
    """The easy-VQA dataset shipped in the ``easy_vqa`` package (38,575 train / 9,673 test questions on
    4,000 / 1,000 64×64 images). Items are samples plus ``question_type`` ("shape", "color", "yes/no").

    ``group_by_image=True`` makes one multi-turn conversation per image (its questions in a fixed
    shuffled order, the image once in the first turn), as LLaVA's instruction data is: the image is
    encoded once for all its questions, which makes an epoch several times cheaper. Items then carry
    ``question_type`` "mixed". Evaluation uses the default, one question per item.

    Decoded images are cached in memory on first use (at most 5,000 small PNGs).
    """

    def __init__(self, split: str = "train", limit: int | None = None, group_by_image: bool = False, seed: int = 0):
        questions, answers, image_ids, self._paths = _easyvqa_split(split)
        if limit is not None:
            questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
        self.split = split
        self.questions, self.targets, self.image_ids = questions, answers, image_ids
        self.answers: list[str] = list(easy_vqa.get_answers())
        """The answer vocabulary (13 words)."""
        types = easyvqa_question_types(self.answers)
        self.question_types: list[str] = [types[a] for a in answers]
        self._cache: dict[int, Image.Image] = {}
        self.group_by_image = group_by_image
        self.groups: list[list[int]] = []
        if group_by_image:
            by_image: dict[int, list[int]] = {}
            for q, img in enumerate(image_ids):
                by_image.setdefault(img, []).append(q)
            g = torch.Generator().manual_seed(seed)
            self.groups = [
                [qs[j] for j in torch.randperm(len(qs), generator=g).tolist()] for _, qs in sorted(by_image.items())
            ]

    def __len__(self) -> int:
        return len(self.groups) if self.group_by_image else len(self.questions)

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image ``image_id`` (cached; a copy is returned so callers may modify it)."""
        if image_id not in self._cache:
            self._cache[image_id] = _load_rgb(Path(self._paths[image_id]))
        return self._cache[image_id].copy()

    def image_key(self, image_id: int) -> str:
        """The cache key of image ``image_id`` (a sample's ``image_keys`` entry)."""
        return f"easyvqa/{self.split}/{image_id}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for easy-VQA {self.split} ({len(self)} items)")
        index %= len(self)
        if self.group_by_image:
            qs = self.groups[index]
            messages = _easyvqa_messages(self.questions[qs[0]], self.targets[qs[0]])
            for q in qs[1:]:
                messages += [{"role": "user", "content": self.questions[q]}, {"role": "assistant", "content": self.targets[q]}]
            image_id = self.image_ids[qs[0]]
            return {
                "id": f"easyvqa-{self.split}-image{image_id}",
                "messages": messages,
                "images": [self.image(image_id)],
                "image_keys": [self.image_key(image_id)],
                "question_type": "mixed",
            }
        image_id = self.image_ids[index]
        return {
            "id": f"easyvqa-{self.split}-{index}",
            "messages": _easyvqa_messages(self.questions[index], self.targets[index]),
            "images": [self.image(image_id)],
            "image_keys": [self.image_key(image_id)],
            "question_type": self.question_types[index],
        }


def export_easyvqa(out_dir: str | Path, split: str = "train", limit: int | None = None) -> Path:
    """Write easy-VQA ``split`` as LLaVA conversation JSON: ``{out_dir}/{split}.json`` with images
    copied to ``{out_dir}/images/{split}/``. Returns the JSON path; load it with
    ``LlavaJsonDataset(path, Path(out_dir) / "images")`` (same ids and messages as ``EasyVQADataset``).
    """
    out_dir = Path(out_dir)
    questions, answers, image_ids, paths = _easyvqa_split(split)
    if limit is not None:
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in sorted(set(image_ids)):
        shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
    records = [
        {
            "id": f"easyvqa-{split}-{i}",
            "image": f"{split}/{image_id}.png",
            "conversations": [
                {"from": "human", "value": f"{MEDIA_TOKENS['image']}\n{q}"},
                {"from": "gpt", "value": a},
            ],
        }
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))
    ]
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    return json_path


# --------------------------------------------------------------------------------------------- LLaVA JSON


def _parse_llava_record(record: Any, index: int, json_path: Path) -> tuple[str, list[dict], dict[str, list[str]]]:
    """Validate one LLaVA record; return (id, messages, media) where ``media`` maps "image", "video",
    "audio" to relative paths and "text" to passages."""

    def fail(what: str, sample_id: Any = None) -> DatasetFormatError:
        who = f"record {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")
        return DatasetFormatError(f"{json_path}: {who}: {what}")

    if not isinstance(record, dict):
        raise fail(f"expected an object with 'id' and 'conversations', got {type(record).__name__}")
    if "id" not in record:
        raise fail("key 'id' is missing")
    sample_id = record["id"]
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise fail(f"key 'id' must be a string or integer, got {type(sample_id).__name__}")
    sample_id = str(sample_id)
    if "conversations" not in record:
        raise fail("key 'conversations' is missing", sample_id)
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise fail("key 'conversations' must be a non-empty list of turns", sample_id)
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise fail(f"conversations[{j}] must be an object with 'from' and 'value'", sample_id)
        for key in ("from", "value"):
            if key not in turn:
                raise fail(f"key 'conversations[{j}].{key}' is missing", sample_id)
        if turn["from"] not in LLAVA_ROLES:
            raise fail(
                f"key 'conversations[{j}].from' has unknown role {turn['from']!r}; "
                f"expected one of {sorted(LLAVA_ROLES)}",
                sample_id,
            )
        if not isinstance(turn["value"], str):
            raise fail(f"key 'conversations[{j}].value' must be a string", sample_id)
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    media = {}
    for key in MEDIA_KEYS:
        items = record.get(key, [])
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            what = "a non-empty passage string or a list of them" if key == "text" else "a path string or a list of path strings"
            raise fail(f"key '{key}' must be {what}", sample_id)
        media[key] = items
    return sample_id, messages, media


class LlavaJsonDataset(Dataset):
    """LLaVA's conversation JSON: a list of ``{"id", "image" (str | list, optional), "video" (str |
    list, optional), "audio" (str | list, optional), "text" (str | list, optional), "conversations":
    [{"from": "human"|"gpt"|"system", "value": str}]}`` with image, video and audio paths relative to
    ``image_folder`` (the media folder) and ``text`` the passage(s) themselves.

    The file and every record are validated here (``DatasetFormatError`` naming the file, the record
    index and id, and the key); media are loaded lazily in ``__getitem__`` (``MediaFileError`` naming
    the file, the sample id and the JSON file when one is missing or cannot be decoded; a video or
    audio file that exists but cannot be used raises ``VideoError`` / ``AudioError``, also naming
    them). Videos are read with ``load_video(path, num_frames, fps, max_frames)`` into ``VideoClip``s
    under the sample's ``"videos"``, audio with ``load_audio(path, sampling_rate)`` into ``(S,)``
    float32 waveforms under ``"audios"``; passages go to ``"texts"`` as they are. JSON only: nothing
    is ever unpickled.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None = None,
        num_frames: int = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        sampling_rate: int = SAMPLING_RATE,
    ):
        self.video_sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}
        self.sampling_rate = int(sampling_rate)
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA JSON file '{self.json_path}' does not exist")
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetFormatError(f"{self.json_path}: not valid JSON ({err})") from err
        if not isinstance(data, list):
            raise DatasetFormatError(
                f"{self.json_path}: expected a JSON list of records, got {type(data).__name__}"
            )
        self.records = [_parse_llava_record(r, i, self.json_path) for i, r in enumerate(data)]
        has_files = any(media[k] for _, _, media in self.records for k in ("image", "video", "audio"))
        if has_files and not self.image_folder.is_dir():
            raise MediaFileError(
                f"image folder '{self.image_folder}' (for {self.json_path}) does not exist"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, messages, media = self.records[index]
        return {
            "id": sample_id,
            "messages": [dict(m) for m in messages],
            "images": [self._load_image(p, sample_id) for p in media["image"]],
            "videos": [self._load_video(p, sample_id) for p in media["video"]],
            "audios": [self._load_audio(p, sample_id) for p in media["audio"]],
            "texts": list(media["text"]),
        }

    def _load_audio(self, relative: str, sample_id: str) -> torch.Tensor:
        path = self.image_folder / relative
        where = f"(sample {sample_id!r} of {self.json_path})"
        if not path.is_file():
            raise MediaFileError(f"audio '{path}' {where} does not exist")
        try:
            return load_audio(path, self.sampling_rate)
        except AudioError as err:
            raise AudioError(err.path, f"{err.problem} {where}") from err

    def _load_video(self, relative: str, sample_id: str) -> VideoClip:
        path = self.image_folder / relative
        where = f"(sample {sample_id!r} of {self.json_path})"
        if not path.is_file():
            raise MediaFileError(f"video '{path}' {where} does not exist")
        try:
            return load_video(path, **self.video_sampling)
        except VideoError as err:
            raise VideoError(err.path, f"{err.problem} {where}") from err

    def _load_image(self, relative: str, sample_id: str) -> Image.Image:
        path = self.image_folder / relative
        where = f"(sample {sample_id!r} of {self.json_path})"
        if not path.is_file():
            raise MediaFileError(f"image '{path}' {where} does not exist")
        try:
            return _load_rgb(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise MediaFileError(f"image '{path}' {where} cannot be decoded: {err}") from err


# --------------------------------------------------------------------------------------------- collator


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged id lists into ``(B, L)`` long tensors on ``side``; returns (values, mask).

    Filled with one boolean-mask assignment: the mask's True cells, in row-major order, are exactly
    the concatenated sequences.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # (B,)
    width = int(lengths.max()) if len(seqs) else 0
    positions = torch.arange(width).unsqueeze(0)  # (1, L)
    if side == "right":
        mask = positions < lengths.unsqueeze(1)  # (B, L)
    else:
        mask = positions >= (width - lengths).unsqueeze(1)  # (B, L)
    values = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    flat = [t for s in seqs for t in s]
    values[mask] = torch.tensor(flat, dtype=torch.long)
    return values, mask.long()


_MISSING = object()


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
        if media_tokens_per_image < 1:
            raise ValueError(f"media_tokens_per_image must be >= 1, got {media_tokens_per_image}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.media_tokens_per_image = int(media_tokens_per_image)
        if media_tokens_per_frame is not None and media_tokens_per_frame < 1:
            raise ValueError(f"media_tokens_per_frame must be >= 1, got {media_tokens_per_frame}")
        self.media_tokens_per_frame = int(media_tokens_per_frame or media_tokens_per_image)
        self.audio_processor = audio_processor
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.generation = generation
        self.media_ids = media_token_ids(tokenizer)
        self.token_cache = LRUCache(cache_size)
        self.image_cache = LRUCache(cache_size)

    def encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int] | None, str | None]:
        """Tokenise one sample: (input ids, labels or None in generation, reference answer or None).

        Fresh lists every call (the cache holds tuples); the media, length and label checks run on
        every call, cached or not.
        """
        ids, labels, reference, _ = self._encode(sample)
        return ids, labels, reference

    def _encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int] | None, str | None, list[list[int]]]:
        """``encode`` plus the sample's tokenised text passages."""
        sample_id = str(sample["id"])
        ids, labels, reference = self._tokenize(sample["messages"])
        self._check_media(sample, sample_id, ids)
        passages = self._passages(sample, sample_id)

        n_images = len(sample.get("images") or [])
        frames = [_video_frames(v).shape[0] for v in sample.get("videos") or []]
        audio_tokens = [self.audio_processor.num_tokens(len(w)) for w in sample.get("audios") or []]
        text_tokens = [len(p) for p in passages]
        n_placeholders = n_images + len(frames) + len(audio_tokens) + len(text_tokens)
        seen = (
            len(ids) - n_placeholders
            + n_images * self.media_tokens_per_image + sum(frames) * self.media_tokens_per_frame
            + sum(audio_tokens) + sum(text_tokens)
        )
        if seen > self.max_length:
            raise SampleTooLongError(
                f"sample {sample_id!r} is {seen} tokens long once its {n_images} image(s) become "
                f"{self.media_tokens_per_image} tokens each, its {len(frames)} video(s) "
                f"({sum(frames)} frames) {self.media_tokens_per_frame} tokens per frame, its "
                f"{len(audio_tokens)} audio clip(s) {sum(audio_tokens)} tokens and its {len(text_tokens)} text "
                f"passage(s) {sum(text_tokens)} tokens ({len(ids)} text ids), over "
                f"max_length={self.max_length}; samples are refused, never cut (raise max_length or "
                f"drop the sample)"
            )
        if labels is None:
            return list(ids), None, reference, passages
        if labels.count(IGNORE_INDEX) == len(labels):
            has_turn = any(m["role"] == "assistant" for m in sample["messages"])
            reason = (
                "the chat template marks no assistant tokens ({% generation %} block missing)"
                if has_turn
                else "it has no assistant turn"
            )
            raise EmptyLabelsError(sample_id, reason)
        return list(ids), list(labels), None, passages

    def _passages(self, sample: dict[str, Any], sample_id: str) -> list[list[int]]:
        """The sample's text passages as token ids (no special tokens); empty passages and passages
        holding a placeholder token are refused."""
        texts = sample.get("texts") or []
        if not texts:
            return []
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"sample {sample_id!r}: 'texts' must be a list of passage strings")
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        placeholders = {i: MEDIA_TOKENS[m] for m, i in self.media_ids.items()}
        for j, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"sample {sample_id!r}: text passage {j} is empty; give it text or drop its <text>")
            inside = sorted({placeholders[i] for i in ids if i in placeholders})
            if inside:
                raise ValueError(
                    f"sample {sample_id!r}: text passage {j} contains the placeholder(s) {inside}; a passage is "
                    f"plain text (put media in the prompt, not in the passage)"
                )
        return [list(ids) for ids in encoded]

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
        if self.generation:
            if messages and messages[-1]["role"] == "assistant":
                reference = messages.pop()["content"]
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
        for modality, key in MEDIA_KEYS.items():
            if sample.get(key) and modality not in self.media_ids:
                raise ValueError(
                    f"sample {sample_id!r} has {modality} media but the tokenizer has no {MEDIA_TOKENS[modality]} "
                    f"token; add it as a special token (tokenizer.add_special_tokens) and resize the LLM's embeddings"
                )
        for modality, token_id in self.media_ids.items():
            n_placeholders = ids.count(token_id)
            n_media = len(sample.get(MEDIA_KEYS[modality]) or [])
            if n_placeholders != n_media:
                raise MediaCountMismatchError(sample_id, MEDIA_TOKENS[modality], n_placeholders, n_media)
        audios = sample.get("audios") or []
        if audios and self.audio_processor is None:
            raise ValueError(
                f"sample {sample_id!r} has {len(audios)} audio clip(s) but the collator has no audio_processor; "
                f"enable `audio:` in the model config and pass audio_processor=model.audio_processor"
            )
        for j, wave in enumerate(audios):
            wave = torch.as_tensor(wave)
            if wave.ndim != 1 or wave.shape[0] == 0 or not bool(torch.isfinite(wave).all()):
                raise ValueError(
                    f"sample {sample_id!r}: audio clip {j} must be a non-empty, finite mono waveform (S,), got "
                    f"shape {tuple(wave.shape)}; load files with llava_deft.audio.load_audio"
                )
            if wave.shape[0] > self.audio_processor.max_samples:
                rate = self.audio_processor.sampling_rate
                raise SampleTooLongError(
                    f"sample {sample_id!r}: audio clip {j} is {wave.shape[0] / rate:.2f} s, longer than the audio "
                    f"encoder's {self.audio_processor.max_samples / rate:g} s chunk; clips are refused, never cut "
                    f"(raise audio.encoder.chunk_length or drop the sample)"
                )

    def _pixels(self, sample: dict[str, Any]) -> list[torch.Tensor]:
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
        passages = [p for _, _, _, ps in encoded for p in ps]
        waves = [torch.as_tensor(w, dtype=torch.float32) for s in samples for w in s.get("audios") or []]
        pixels = [p for s in samples for p in self._pixels(s)]
        videos = [frames_to_pixels(_video_frames(v), self.image_transform) for s in samples for v in s.get("videos") or []]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            # stack copies: the batch never aliases image_cache
            "pixel_values": torch.stack(pixels).float() if pixels else None,
            "media_counts": torch.tensor([len(s.get("images") or []) for s in samples], dtype=torch.long),
            "video_values": torch.cat(videos).float() if videos else None,  # (F, 3, H, W)
            "video_frames": torch.tensor([v.shape[0] for v in videos], dtype=torch.long),
            "video_counts": torch.tensor([len(s.get("videos") or []) for s in samples], dtype=torch.long),
            "audio_values": self.audio_processor.features(waves) if waves else None,  # (A, n_mels, frames)
            "audio_lengths": torch.tensor([w.shape[0] for w in waves], dtype=torch.long),
            "audio_counts": torch.tensor([len(s.get("audios") or []) for s in samples], dtype=torch.long),
            "text_ids": pad_sequences(passages, self.tokenizer.pad_token_id, "right")[0] if passages else None,
            "text_lengths": torch.tensor([len(p) for p in passages], dtype=torch.long),
            "text_counts": torch.tensor([len(s.get("texts") or []) for s in samples], dtype=torch.long),
            "ids": [str(s["id"]) for s in samples],
        }
        if self.generation:
            batch["references"] = [ref for _, _, ref, _ in encoded]
        else:
            batch["labels"], _ = pad_sequences(
                [labels for _, labels, _, _ in encoded], IGNORE_INDEX, self.padding_side
            )
        return batch


def _video_frames(video: VideoClip | torch.Tensor) -> torch.Tensor:
    """The ``(T, H, W, 3)`` uint8 frames of a sample's video (a ``VideoClip`` or the tensor itself)."""
    return video.frames if isinstance(video, VideoClip) else video


def build_generation_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    image_transform: Callable[[Image.Image], torch.Tensor],
    media_tokens_per_image: int,
    max_length: int,
    system: str | None = None,
) -> dict[str, Any]:
    """Left-padded generation batch for user ``prompts`` (each with one ``<image>`` per image in
    ``images[i]``): the ``MultimodalCollator(generation=True)`` output, ids ``prompt-{i}``.
    """
    if len(prompts) != len(images):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt"
        )
    prefix = [{"role": "system", "content": system}] if system is not None else []
    samples = [
        {"id": f"prompt-{i}", "messages": prefix + [{"role": "user", "content": p}], "images": list(imgs)}
        for i, (p, imgs) in enumerate(zip(prompts, images))
    ]
    collator = MultimodalCollator(
        tokenizer, image_transform, media_tokens_per_image, max_length, padding_side="left", generation=True
    )
    return collator(samples)
