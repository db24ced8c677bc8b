"""The viewer's model side: controls of the LLM stages, request validation, and one traced prefill.

    session = ViewerSession(llava_deft.load_model("runs/x/final"))
    session.describe()                                   # stages, their options and ranges, limits
    session.run({"text": "what shape?", "image": "data:image/png;base64,...",
                 "stages": {"0": {"drop_ratio": 0.75}}})  # tokens, per-layer fates, ratios, KV bytes

A request names stages by their place in the model's ``pipeline.llm`` list (``"0"``, ``"1"``, ...) and
sets any of their options; a stage with changed options is rebuilt from its registered class with the
new options and loads the learned parameters (``state_dict``) of the model's own stage, so only the
option changes. Options that would change a parameter's shape (e.g. ``pair_compress.hidden_dim``) are
shown but not editable. Every check raises :class:`ViewerRequestError` naming the field and what is
allowed; the server answers it with HTTP 400.

``run`` encodes and reduces the media with the model's pre-LLM pipeline (cached per prompt), then runs
the LLM's prefill twice per prompt at most: once recorded with the LLM stages
(``LLMStages(..., record=True)``, :mod:`llava_deft.viewer.trace` turns the record into fates), and once
without any LLM stage (cached per prompt), whose cache gives the "without stages" KV bytes: both figures
are measured tensor sizes, not estimates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import threading
import time
import types
import typing
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from torch import nn

from pipeline.llm import CachePolicy, LayerStage
from pipeline.registry import BUILDER_ARGS

from ..errors import InvalidArgumentError, LlavaDeftError
from ..model.llm.runtime import LLMStages
from ..modality import MEDIA_INPUTS, to_rgb
from ..overlay import encoder_view
from .trace import follow_tokens

__all__ = ["OptionSpec", "ViewerRequestError", "ViewerSession"]

MAX_TEXT_CHARS = 4000
"""Longest prompt text a request may carry (characters)."""
MAX_IMAGE_BYTES = 8 * 2**20
"""Largest uploaded image file (bytes, after base64 decoding)."""
MAX_IMAGE_PIXELS = 16_000_000
"""Most pixels of an uploaded image (the model's ``limits.max_image_pixels`` applies too, whichever is less)."""
REQUEST_KEYS = ("text", "image", "stages")
_CACHE_ENTRIES = 8  # prompts (encoded media + the stage-free prefill) and rebuilt stages kept for re-runs


class ViewerRequestError(InvalidArgumentError):
    """A viewer request is invalid: ``field`` names the input (``stages.0.drop_ratio``), ``allowed`` says
    what it accepts (a range, a list of names); the message says both."""

    def __init__(self, field: str, message: str, allowed: Any = None):
        self.field, self.allowed = field, allowed
        super().__init__(f"{field}: {message}" + (f" (allowed: {allowed})" if allowed is not None else ""))

    def payload(self) -> dict:
        return {"error": str(self), "field": self.field, "allowed": self.allowed}


@dataclass
class OptionSpec:
    """One option of a stage as the page shows it. ``type``: ``int``, ``float``, ``bool``, ``choice`` or
    ``fixed`` (not settable here, e.g. a list); ``min`` / ``max`` with ``*_exclusive`` from the option's
    constraints (None: unbounded); ``editable`` False (with ``why``) for options that change learned shapes."""

    name: str
    type: str
    value: Any
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: list | None = None
    editable: bool = True
    why: str | None = None

    def allowed(self) -> Any:
        if self.type == "choice":
            return self.choices
        if self.type == "bool":
            return [True, False]
        what = "an integer" if self.type == "int" else "a number"
        if self.min is not None and self.max is not None:
            return (f"{what} in {'(' if self.min_exclusive else '['}{self.min:g}, {self.max:g}"
                    f"{')' if self.max_exclusive else ']'}")
        if self.min is not None:
            return f"{what} {'>' if self.min_exclusive else '>='} {self.min:g}"
        if self.max is not None:
            return f"{what} {'<' if self.max_exclusive else '<='} {self.max:g}"
        return what

    def check(self, value: Any, field: str) -> Any:
        """``value`` if this option takes it, else :class:`ViewerRequestError`."""
        if not self.editable:
            raise ViewerRequestError(field, f"cannot be changed in the viewer: {self.why}")
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ViewerRequestError(field, f"must be true or false, got {value!r}", self.allowed())
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise ViewerRequestError(field, f"{value!r} is not a choice", self.allowed())
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ViewerRequestError(field, f"must be a finite number, got {value!r}", self.allowed())
        if self.type == "int":
            if float(value) != int(value):
                raise ViewerRequestError(field, f"must be an integer, got {value!r}", self.allowed())
            value = int(value)
        low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        high = self.max is not None and (value >= self.max if self.max_exclusive else value > self.max)
        if low or high:
            raise ViewerRequestError(field, f"{value!r} is out of range", self.allowed())
        return float(value) if self.type == "float" else value


def _strip_optional(annotation: Any) -> tuple[Any, list]:
    """(base type, constraint metadata) of an option annotation: ``Optional`` and ``Annotated`` unwrapped."""
    metadata: list = []
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return annotation, metadata
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        for item in extra:
            metadata.extend(getattr(item, "metadata", None) or [item])
        annotation = base
    return annotation, metadata


def _option_spec(name: str, field, value: Any) -> OptionSpec:
    annotation, metadata = _strip_optional(field.annotation)
    metadata = list(field.metadata) + metadata
    if typing.get_origin(annotation) is Literal:
        return OptionSpec(name, "choice", value, choices=list(typing.get_args(annotation)))
    if annotation is bool:
        return OptionSpec(name, "bool", value)
    if annotation not in (int, float):
        return OptionSpec(name, "fixed", value, editable=False, why="only numbers, switches and choices are settable here")
    spec = OptionSpec(name, annotation.__name__, value)
    for m in metadata:
        for attr, bound, exclusive in (("ge", "min", False), ("gt", "min", True), ("le", "max", False), ("lt", "max", True)):
            if getattr(m, attr, None) is not None:
                setattr(spec, bound, getattr(m, attr))
                setattr(spec, f"{bound}_exclusive", exclusive)
    return spec


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _build(cls: type, dim: int, options: dict, device: str | torch.device) -> nn.Module:
    with torch.device(device):
        return cls(dim=dim, **options)


def _changes_shapes(cls: type, dim: int, options: dict, spec: OptionSpec) -> bool:
    """Whether another value of an int option gives the stage other parameter names or shapes (built on
    the meta device: no memory); a value the class refuses counts as a change."""
    if spec.type != "int" and not (spec.type == "fixed" and spec.value is None):
        return False
    base = int(spec.value) if spec.value is not None else 1
    probe = base + 1 if spec.max is None or base + 1 <= spec.max else base - 1
    try:
        return _shapes(_build(cls, dim, options, "meta")) != _shapes(_build(cls, dim, {**options, spec.name: probe}, "meta"))
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return True


@dataclass
class StageControl:
    """A stage of the loaded model's ``pipeline.llm`` and its settable options."""

    id: str
    name: str
    kind: str  # "layer" or "cache"
    options: dict[str, OptionSpec]
    stage: nn.Module
    values: dict[str, Any]

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind,
                "options": [{**asdict(s), "allowed": s.allowed()} for s in self.options.values()]}


@dataclass
class Prepared:
    """One prompt after the pre-LLM part (cached per text and image): the LLM's inputs and the page's tokens."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    kinds: torch.Tensor
    tokens: list[dict]
    image: dict | None
    without: dict | None = None  # the stage-free prefill: per-layer KV bytes and its next token


class ViewerSession:
    """A loaded model (:class:`~llava_deft.inference.LlavaDeft`) served to the viewer; thread-safe (one
    request runs the model at a time)."""

    def __init__(self, api, max_text_chars: int = MAX_TEXT_CHARS, max_image_bytes: int = MAX_IMAGE_BYTES):
        for name, value in (("max_text_chars", max_text_chars), ("max_image_bytes", max_image_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r}: give a positive integer (the viewer's request limit)")
        self.api = api
        self.net = api.model
        self.lm = self.net.llm
        self.max_text_chars, self.max_image_bytes = max_text_chars, max_image_bytes
        limits = getattr(getattr(self.net.config, "limits", None), "max_image_pixels", None)
        self.max_image_pixels = min(MAX_IMAGE_PIXELS, limits or MAX_IMAGE_PIXELS)
        self.lock = threading.Lock()
        self.num_layers = self.lm.num_layers
        cfg = self.net.pipeline.config
        configs = list(getattr(cfg, "llm", []) or []) if cfg is not None else []
        self.controls: list[StageControl] = []
        for pos, stage in enumerate(self.net.pipeline.llm):
            values = configs[pos].model_dump(exclude={"name"}) if pos < len(configs) else {}
            self.controls.append(self._control(str(pos), stage, values))
        self._built: OrderedDict[str, nn.Module] = OrderedDict()
        self._prompts: OrderedDict[str, Prepared] = OrderedDict()
        by_id = {token_id: kind for kind, token_id in self.net.media_token_ids.items() if token_id >= 0}
        self._media_ids = by_id

    # ------------------------------------------------------------------ controls
    def _control(self, sid: str, stage: nn.Module, values: dict) -> StageControl:
        cls = type(stage)
        fields = {k: f for k, f in cls.Config.model_fields.items() if k != "name" and k not in BUILDER_ARGS}
        values = {k: values.get(k, f.default) for k, f in fields.items()}
        options = {}
        for k, f in fields.items():
            spec = _option_spec(k, f, values[k])
            if isinstance(stage, LayerStage) and k == "layer":  # the contract: it runs between layer-1 and layer
                spec.min, spec.max, spec.min_exclusive, spec.max_exclusive = 1, self.num_layers - 1, False, False
            if spec.editable and _changes_shapes(cls, self.net.pipeline.dim or self.lm.hidden_size, values, spec):
                spec.editable, spec.why = False, "another value changes the shapes of the stage's learned parameters"
            options[k] = spec
        kind = "layer" if isinstance(stage, LayerStage) else "cache" if isinstance(stage, CachePolicy) else "other"
        return StageControl(sid, stage.stage_name, kind, options, stage, values)

    def describe(self) -> dict:
        """What the page needs to draw its controls: the model's layers, the stages and limits."""
        cfg = self.lm.config
        return {
            "layers": self.num_layers, "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "stages": [c.describe() for c in self.controls], "pre_llm": list(self.net.pipeline.names),
            "vision": self.net.vision is not None,
            "limits": {"max_text_chars": self.max_text_chars, "max_image_bytes": self.max_image_bytes,
                       "max_image_pixels": self.max_image_pixels},
        }

    # ------------------------------------------------------------------ validation
    def check_request(self, request: Any) -> tuple[str, Image.Image | None, list[dict]]:
        """(text, image or None, options per stage) of a request; :class:`ViewerRequestError` otherwise."""
        if not isinstance(request, dict):
            raise ViewerRequestError("<body>", f"must be a JSON object, got {type(request).__name__}", list(REQUEST_KEYS))
        unknown = sorted(set(request) - set(REQUEST_KEYS))
        if unknown:
            raise ViewerRequestError(unknown[0], "is not a request key", list(REQUEST_KEYS))
        text = request.get("text", "")
        if not isinstance(text, str):
            raise ViewerRequestError("text", f"must be a string, got {type(text).__name__}")
        if len(text) > self.max_text_chars:
            raise ViewerRequestError("text", f"has {len(text)} characters, over the limit", f"at most {self.max_text_chars}")
        image = self._image(request.get("image"))
        return text, image, self._stage_options(request.get("stages") or {})

    def _image(self, data: Any) -> Image.Image | None:
        if data is None:
            return None
        if self.net.vision is None:
            raise ViewerRequestError("image", "this model has no vision tower; send text only")
        if not isinstance(data, str):
            raise ViewerRequestError("image", f"must be a data URL string, got {type(data).__name__}",
                                     "data:image/<png|jpeg|...>;base64,<bytes>")
        head, _, payload = data.partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            raise ViewerRequestError("image", "is not a base64 image data URL", "data:image/<png|jpeg|...>;base64,<bytes>")
        if len(payload) > 4 * (self.max_image_bytes // 3 + 1):
            raise ViewerRequestError("image", "file is over the size limit", f"at most {self.max_image_bytes:,} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ViewerRequestError("image", "is not valid base64") from None
        try:
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > self.max_image_pixels:
                raise ViewerRequestError("image", f"{img.width} x {img.height} pixels is over the limit",
                                         f"at most {self.max_image_pixels:,} pixels")
            return to_rgb(img)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, ViewerRequestError):
                raise
            raise ViewerRequestError("image", f"cannot be decoded as an image ({type(err).__name__})") from None

    def _stage_options(self, stages: Any) -> list[dict]:
        if not isinstance(stages, dict):
            raise ViewerRequestError("stages", f"must be an object of stage id -> options, got {type(stages).__name__}",
                                     [c.id for c in self.controls])
        by_id = {c.id: c for c in self.controls}
        out = [dict(c.values) for c in self.controls]
        for sid, options in stages.items():
            if sid not in by_id:
                raise ViewerRequestError(f"stages.{sid}", "is not a stage of this model",
                                         [f"{c.id} ({c.name})" for c in self.controls])
            control = by_id[sid]
            if not isinstance(options, dict):
                raise ViewerRequestError(f"stages.{sid}", "must be an object of option -> value", list(control.options))
            for name, value in options.items():
                field = f"stages.{sid}.{name}"
                if name not in control.options:
                    raise ViewerRequestError(field, f"is not an option of stage {control.name!r}", list(control.options))
                out[int(sid)][name] = control.options[name].check(value, field)
        for control, values in zip(self.controls, out):
            try:
                type(control.stage).Config.model_validate({"name": control.name, **values})
            except ValidationError as err:
                first = err.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise ViewerRequestError(f"stages.{control.id}.{loc}", first["msg"]) from None
        return out

    # ------------------------------------------------------------------ stages
    def _stage(self, control: StageControl, values: dict) -> nn.Module:
        """The model's stage itself when ``values`` are its own, else a rebuilt one with its learned state."""
        if values == control.values:
            return control.stage
        key = json.dumps([control.id, values], sort_keys=True, default=str)
        if key in self._built:
            self._built.move_to_end(key)
            return self._built[key]
        own = control.stage
        first = next(iter(own.parameters()), None)
        stage = _build(type(own), self.net.pipeline.dim or self.lm.hidden_size, values, "cpu")
        stage.load_state_dict(own.state_dict())
        stage = stage.to(device=self.api.device, dtype=first.dtype if first is not None else None).eval()
        self._built[key] = stage
        while len(self._built) > _CACHE_ENTRIES:
            self._built.popitem(last=False)
        return stage

    # ------------------------------------------------------------------ prompt
    def _prepare(self, text: str, image: Image.Image | None) -> Prepared:
        key = json.dumps([text, None if image is None else hashlib.sha256(image.tobytes()).hexdigest(), image and image.size])
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        api, net = self.api, self.net
        batch = api.build_batch([text], images=[[image]] if image is not None else None)
        media = {k: v for k, v in batch.items() if k in MEDIA_INPUTS}
        with net._trace_pipeline() as ptrace:
            sp, _, _ = net.prepare_inputs(batch["input_ids"], batch["attention_mask"], padding_side="left", **media)
        reductions = net._media_reductions(batch["input_ids"], batch["attention_mask"], ptrace)[0]
        mask = sp.attention_mask.bool()
        tokens = self._tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist(), reductions,
                              sp.position_ids[0][mask[0]].tolist(), sp.kinds[0][mask[0]].tolist())
        prepared = Prepared(sp.embeds, mask, sp.position_ids, sp.kinds, tokens,
                            self._image_view(image, reductions, tokens) if image is not None else None)
        self._prompts[key] = prepared
        while len(self._prompts) > _CACHE_ENTRIES:
            self._prompts.popitem(last=False)
        return prepared

    def _tokens(self, ids: list[int], reductions: list, positions: list[int], kinds: list[int]) -> list[dict]:
        """The LLM's prompt, one entry per column: text pieces decoded, media tokens as ``<img r,c>``."""
        tok = self.api.tokenizer
        out, media = [], iter(reductions)
        prev = None
        for tid in ids:
            kind = self._media_ids.get(tid)
            if kind is None:
                piece = tok.decode([tid])
                if prev is not None:  # tokenizers that drop a word's leading space alone keep it after a token
                    both, alone = tok.decode([prev, tid]), tok.decode([prev])
                    piece = both[len(alone):] if both.startswith(alone) else piece
                out.append({"text": piece, "kind": "text"})
                prev = tid
                continue
            red = next(media)
            _, h, w = red.layout  # (T, H, W): an image is one frame
            for idx in red.kept:
                frame, (r, c) = idx // (h * w), divmod(idx % (h * w), w)
                label = {"image": f"<img {r},{c}>", "video": f"<vid {frame},{r},{c}>"}.get(kind, f"<{kind} {idx}>")
                out.append({"text": label, "kind": kind, "item": red.item, "patch": idx})
            prev = None
        if len(out) != len(positions):
            raise RuntimeError(f"viewer: {len(out)} prompt tokens rebuilt but the LLM received {len(positions)}")
        for t, pos, k in zip(out, positions, kinds):
            t["position"] = pos
            if (k == -1) != (t["kind"] == "text"):
                raise RuntimeError(f"viewer: token {t['text']!r} is {t['kind']} but the LLM got kind {k}")
        return out

    def _image_view(self, image: Image.Image, reductions: list, tokens: list[dict]) -> dict:
        """The image as the encoder sees it (PNG data URL), its patch grid, and each patch's token number
        (None: the pre-LLM pipeline removed it)."""
        red = next(r for r in reductions if r.kind == "image")
        view = encoder_view(self.net.image_transform, image)
        buf = io.BytesIO()
        view.save(buf, format="PNG")
        column = {t["patch"]: i for i, t in enumerate(tokens) if t["kind"] == "image" and t["item"] == red.item}
        _, h, w = red.layout
        return {"src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "grid": [h, w],
                "size": list(view.size), "token_of_patch": [column.get(p) for p in range(red.total)],
                "pre_llm_kept": len(red.kept), "total": red.total}

    def _without(self, p: Prepared) -> dict:
        """The same prefill with no LLM stage: per-layer KV bytes of its cache and its next token."""
        if p.without is None:
            logits, cache = self.lm(p.embeds, p.mask.long(), p.positions, use_cache=True, logits_to_keep=1, stages=[])
            per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) for layer in cache.layers]
            p.without = {"bytes": per_layer, "next_token": self.api.tokenizer.decode([int(logits[0, -1].argmax())])}
        return p.without

    # ------------------------------------------------------------------ run
    def run(self, request: Any) -> dict:
        """Validate ``request`` and run it (see the module docstring); returns the JSON-ready result."""
        text, image, options = self.check_request(request)
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            try:
                p = self._prepare(text, image)
            except LlavaDeftError as err:  # the model refuses the prompt (a typed placeholder, a prompt too long)
                raise _request_error(err) from None
            stages = [self._stage(c, v) for c, v in zip(self.controls, options)]
            try:
                runner = LLMStages(self.lm, stages, record=True) if stages else None
            except ValueError as err:  # an option the stage's bind() refuses for this model
                raise ViewerRequestError("stages", str(err)) from None
            logits, cache = self.lm(p.embeds, p.mask.long(), p.positions, use_cache=True, logits_to_keep=1,
                                    stages=runner if runner is not None else [], token_kinds=p.kinds)
            without = self._without(p)
            policies = {i: s.stage_name for i, s in runner.policies.items()} if runner is not None else {}
            layers = follow_tokens(runner.trace if runner is not None else [], self.num_layers, p.mask, p.positions,
                                   cache if runner is not None else None, policies)
            with_bytes = (_cache_bytes(cache) if runner is not None else list(without["bytes"]))
            elapsed = time.perf_counter() - start
        n = len(p.tokens)
        traces = runner.trace if runner is not None else []
        return {
            "tokens": [{"i": i, **t} for i, t in enumerate(p.tokens)],
            "layers": [{"layer": lf.layer, "tokens": lf.tokens, "ratio": lf.tokens / n,
                        "cache_tokens": lf.cache_tokens, "cache_ratio": None if lf.cache_tokens is None else lf.cache_tokens / n,
                        "counts": {f: lf.fate.count(f) for f in ("kept", "merged", "dropped", "evicted")},
                        "groups": len({g for g in lf.group if g is not None}),
                        "fate": lf.fate, "group": lf.group, "by": lf.by, "heads": lf.heads,
                        "kv_bytes": with_bytes[lf.layer], "kv_bytes_without": without["bytes"][lf.layer]}
                       for lf in layers],
            "stages": [{"id": c.id, "name": c.name, "kind": c.kind, "options": v,
                        "after_layer": next((t.after_layer for t in traces if t.position == j), None),
                        "stats": _plain(getattr(s, "last_stats", None) or getattr(s, "stats", None) or {})}
                       for j, (c, v, s) in enumerate(zip(self.controls, options, stages))],
            "memory": {"with_stages": sum(with_bytes), "without_stages": sum(without["bytes"]),
                       "ratio": sum(with_bytes) / max(1, sum(without["bytes"])),
                       "method": "measured: bytes of the keys and values each layer's cache holds after this prefill, "
                                 "with the LLM stages (their StagedCache, spare slot included) and from the same "
                                 "prefill run again with no LLM stage; the pre-LLM pipeline applies to both"},
            "next_token": {"with_stages": self.api.tokenizer.decode([int(logits[0, -1].argmax())]),
                           "without_stages": without["next_token"]},
            "image": p.image, "prompt_tokens": n, "elapsed_ms": round(1000 * elapsed, 1),
        }


def _cache_bytes(cache) -> list[int]:
    return [layer.bytes() for layer in cache.layers]


def _plain(stats: dict) -> dict:
    """The JSON-friendly part of a stage's statistics (numbers; per-layer dicts of numbers)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:  # statistics kept on the device until read
            v = v.item()
        if _number(v):
            out[str(k)] = v
        elif isinstance(v, dict):
            inner = {str(a): b for a, b in v.items() if _number(b)}
            if inner:
                out[str(k)] = inner
    return out


def _request_error(err: LlavaDeftError) -> ViewerRequestError:
    """A model-side refusal of the prompt (a placeholder typed without its media, a prompt too long)."""
    return err if isinstance(err, ViewerRequestError) else ViewerRequestError("text", str(err))



def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
