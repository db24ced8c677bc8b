"""transformers' LLaVA checkpoints <-> ``LlavaDeftForCausalLM``.

A directory written by ``LlavaForConditionalGeneration.save_pretrained`` (``config.json`` with
``model_type: llava``; ``model.safetensors``, or shards named by ``model.safetensors.index.json``;
tokenizer files; the processor's settings and chat template) loads as our model
(``LlavaDeftForCausalLM.from_pretrained`` dispatches here):

- vision: ``backend: hf_clip`` with the checkpoint's ``vision_config`` (CLIP towers only),
  ``vision_feature_layer`` (one layer) and ``vision_feature_select_strategy``; the image transform is the
  directory's ``CLIPImageProcessor`` settings (else CLIP's at the tower's size);
- projector: ``mlp2x_gelu`` (``projector_hidden_act`` must be ``gelu``, with biases);
- LLM: the ``text_config`` as it is (Llama / Qwen2 / Qwen3), built in float32; its embedding rows are
  kept (llava-1.5 pads 32,002 tokens to 32,064 rows);
- tokenizer: the directory's; its ``<image>`` must be one token, the config's ``image_token_id``; a
  tokenizer without a pad token pads with its unk token; a chat template for typed content parts
  (llava-hf's) gets the string-content prefix of ``load_tokenizer``;
- ``max_length``: the text model's ``max_position_embeddings``; ``pipeline``: none unless given.

Weights are named three ways in the files, and each loads: what transformers 5.24's
``save_pretrained`` writes (``vision_tower.*``, ``multi_modal_projector.linear_{1,2}.*``,
``language_model.model.*``, ``language_model.lm_head.*``: it maps its modules back to the old names),
transformers 4.x's (the same but ``vision_tower.vision_model.*``: llava-hf/llava-1.5-7b-hf's), and the
modules' own names (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head.*``: a state dict saved as it is). Weights come only from
safetensors; a directory of pickles is refused with the command that converts it. ``export_hf_llava``
writes a directory that ``LlavaForConditionalGeneration.from_pretrained`` loads (through transformers'
own ``save_pretrained``).

    model = LlavaDeftForCausalLM.from_pretrained("llava-1.5-7b-hf")
    export_hf_llava(model, "out")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..config.model import load_model_config
from ..encoders.image import CONFIG_BOOKKEEPING, PROCESSOR_FILES, clip_image_settings, clip_vision_kwargs
from ..encoders.weights import read_safetensors_dir
from ..errors import CheckpointError, UnsupportedCheckpointError
from .checkpoint import CONFIG_NAME, load_state, read_config_json
from .llm.families import FAMILIES, RopeFamily
from .tokenizer import load_tokenizer, media_token_ids

LOADER = "LlavaForConditionalGeneration"

WEIGHT_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision.model.": ("model.vision_tower.", "vision_tower.vision_model.", "vision_tower."),
    "projector.0.": ("model.multi_modal_projector.linear_1.", "multi_modal_projector.linear_1."),
    "projector.2.": ("model.multi_modal_projector.linear_2.", "multi_modal_projector.linear_2."),
    "llm.hf.model.": ("model.language_model.", "language_model.model."),
    "llm.hf.lm_head.": ("lm_head.", "language_model.lm_head."),
}
"""Our state-dict prefix -> the HF llava prefixes that hold it: the modules' names first (what
``export_hf_llava`` loads into ``LlavaForConditionalGeneration``), then the files' (the longest
matching prefix wins, so ``vision_tower.vision_model.`` before ``vision_tower.``)."""

NOT_IN_HF_LLAVA = ("pipeline.", "audio.", "audio_projector.")
"""Our modules an HF llava has no place for: they keep their init when loading one."""

LLAVA_TEXT_TYPES = tuple(t for t, family in FAMILIES.items() if family is RopeFamily)
"""The LLM families an HF llava checkpoint can hold for us: those whose base model is ``model`` (the
prefixes above); GPT-2's is ``transformer``."""

_FROM_HF = sorted(((hf, ours) for ours, hfs in WEIGHT_PREFIXES.items() for hf in hfs), key=lambda p: -len(p[0]))


def is_hf_llava_config(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is transformers' LLaVA's."""
    return config.get("model_type") == "llava"


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF llava state dict (either layout) in our names; a key of no known prefix is kept as is
    (and reported as unexpected when loaded)."""
    out = {}
    for key, value in state.items():
        hit = next(((hf, ours) for hf, ours in _FROM_HF if key.startswith(hf)), None)
        out[key if hit is None else hit[1] + key[len(hit[0]):]] = value
    return out


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (vision, projector and LLM keys only) in transformers 5's llava names."""
    out = {}
    for key, value in state.items():
        ours = next(p for p in WEIGHT_PREFIXES if key.startswith(p))
        out[WEIGHT_PREFIXES[ours][0] + key[len(ours):]] = value
    return out


_WHAT_WE_BUILD = (  # (LlavaConfig key, what we build, whether a value fits it)
    ("vision_config.model_type", "a CLIP tower ('clip_vision_model')", lambda v: v == "clip_vision_model"),
    ("text_config.model_type", f"one of {list(LLAVA_TEXT_TYPES)}", lambda v: v in LLAVA_TEXT_TYPES),
    ("projector_hidden_act", "'gelu' (the mlp2x_gelu projector)", lambda v: v == "gelu"),
    ("multimodal_projector_bias", "true (the projector's Linear layers have biases)", lambda v: v is True),
    ("vision_feature_layer", "one layer (an int)", lambda v: isinstance(v, int)),
    ("vision_feature_select_strategy", "'default' or 'full'", lambda v: v in ("default", "full")),
)


def llava_config(directory: Path, raw: dict) -> LlavaConfig:
    """The checkpoint's ``LlavaConfig``, refused (naming the key) where we cannot build it."""
    file = directory / CONFIG_NAME
    try:
        config = LlavaConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"'{file}' is not a valid LLaVA config ({e}); re-export the model or re-download the file"
        ) from None
    bad = []
    for key, need, fits in _WHAT_WE_BUILD:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if not fits(value):
            bad.append(f"{key} is {value!r}, llava-deft needs {need}")
    if bad:
        raise UnsupportedCheckpointError(f"'{file}' cannot be loaded: " + "; ".join(bad))
    return config


def hf_llava_model_config(directory: Path, config: LlavaConfig) -> dict[str, Any]:
    """Our model config (a dict for ``load_model_config``) of an HF llava directory."""
    text = config.text_config
    llm = {k: v for k, v in text.to_diff_dict().items() if k not in CONFIG_BOOKKEEPING}
    llm.update(model_type=text.model_type, vocab_size=text.vocab_size,
               tie_word_embeddings=bool(config.tie_word_embeddings))  # LlavaConfig's, which wins over text_config's
    image_processor = None
    if any((directory / f).is_file() for f in PROCESSOR_FILES):
        processor = CLIPImageProcessor.from_pretrained(str(directory), local_files_only=True)
        image_processor = clip_image_settings(processor)
    return {
        "vision": {"backend": "hf_clip", "kwargs": clip_vision_kwargs(config.vision_config),
                   "vision_feature_layer": config.vision_feature_layer,
                   "vision_feature_select_strategy": config.vision_feature_select_strategy,
                   "image_processor": image_processor},
        "projector": {"type": "mlp2x_gelu"},
        "llm": {"config": llm},
        "tokenizer": str(directory),
        "max_length": int(text.max_position_embeddings),
    }


def load_hf_llava(path: str | Path, pipeline: dict | list | str | None = None, *, model_class, **overrides):
    """Load an HF llava directory as ``model_class`` (``LlavaDeftForCausalLM``, which passes itself:
    ``LlavaDeftForCausalLM.from_pretrained(path)`` is the way in). ``pipeline`` adds a reduction
    pipeline (its learned stages keep their init); ``overrides`` set top-level config keys, as
    ``from_pretrained``'s do.

    Order: config (typed errors for what we cannot build), tokenizer, weights (safetensors only: a
    pickle-only directory, a missing shard, a corrupt file are ``CheckpointError``s naming the file),
    then the model is built and every weight must land (``load_state``).
    """
    directory = Path(path)
    config = llava_config(directory, read_config_json(directory))
    cfg = load_model_config({**hf_llava_model_config(directory, config), "pipeline": pipeline, **overrides})
    tokenizer = load_tokenizer(directory, pad_from_unk=True)
    image_id = media_token_ids(tokenizer).get("image")
    if image_id != config.image_token_id:
        raise CheckpointError(
            f"'{directory / CONFIG_NAME}' has image_token_id {config.image_token_id} but the tokenizer of '{directory}' "
            f"encodes <image> as id {image_id}; they must be the same token (fix image_token_id or the tokenizer)"
        )
    state = hf_to_ours(read_safetensors_dir(directory, LOADER))
    model = model_class(cfg, tokenizer=tokenizer)
    # non-persistent buffers (CLIP's position_ids, RoPE's inv_freq) that older checkpoints stored
    buffers = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    load_state(model, {k: v for k, v in state.items() if k not in buffers}, directory, may_miss=NOT_IN_HF_LLAVA)
    return model


def export_hf_llava(model, out_dir: str | Path, drop_unsupported: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` (``vision.backend: hf_clip`` + ``mlp2x_gelu`` projector) as a directory that
    ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load:
    config.json, safetensors (sharded past ``max_shard_size``), tokenizer and ``LlavaProcessor``
    settings (our chat template, the CLIP image settings, one extra image token for CLS).

    An HF llava has no place for learned reduction stages nor an audio encoder: a model with them is
    refused (``UnsupportedCheckpointError``) unless ``drop_unsupported`` (the HF model then sees
    every media token, as with no pipeline).
    """
    cfg = model.config
    problems = []
    if cfg.vision.backend != "hf_clip":
        problems.append(f"vision.backend is {cfg.vision.backend!r}, an HF llava holds a CLIP tower (hf_clip)")
    if cfg.projector.type != "mlp2x_gelu":
        problems.append(f"projector.type is {cfg.projector.type!r}, an HF llava's projector is mlp2x_gelu")
    if problems:
        raise UnsupportedCheckpointError("export_hf_llava: " + "; ".join(problems))
    ours = model.state_dict()
    extra = sorted({k.split(".")[0] for k in ours if k.startswith(NOT_IN_HF_LLAVA)})
    if extra and not drop_unsupported:
        raise UnsupportedCheckpointError(
            f"export_hf_llava: an HF llava has no place for this model's {extra} weights (learned reduction "
            f"stages, audio encoder); pass drop_unsupported=True to export without them"
        )
    vision, text = model.vision.model.config, model.llm.config
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=model.image_token_id,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=cfg.vision.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision.vision_feature_select_strategy,
        image_seq_length=model.media_tokens_per_image, tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    with torch.device("meta"):  # no second copy of the weights: the HF modules take ours
        hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict(ours_to_hf({k: v for k, v in ours.items() if not k.startswith(NOT_IN_HF_LLAVA)}),
                       strict=True, assign=True)
    out = Path(out_dir)
    hf.save_pretrained(str(out), max_shard_size=max_shard_size)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**model.vision.image_settings), tokenizer=model.tokenizer,
        patch_size=vision.patch_size, vision_feature_select_strategy=cfg.vision.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=model.tokenizer.chat_template,
    )
    processor.save_pretrained(str(out))
    return out
