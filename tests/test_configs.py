"""Every shipped config validates, and every model-config key changes what is built (none is ignored)."""

import json
from pathlib import Path

import pytest
import torch

from llava_deft.config import ModelConfig, load_model_config
from llava_deft.errors import ConfigError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_config_validates():
    models = sorted((ROOT / "configs" / "model").rglob("*.yaml"))
    trains = sorted((ROOT / "configs" / "train").rglob("*.yaml"))
    ds = sorted((ROOT / "configs" / "deepspeed").rglob("*.json"))
    # exact counts: a listing that misses files (a non-recursive glob) must fail here
    assert (len(models), len(trains), len(ds)) == (10, 18, 3), "a config was added or removed: update these counts"
    for p in models:
        load_model_config(p)
    for p in trains:
        cfg = load_train_config(p)
        load_model_config(cfg.model)
        assert (ROOT / cfg.deepspeed).is_file(), f"{p}: deepspeed config {cfg.deepspeed} missing"
    for p in ds:
        zero = json.loads(p.read_text())["zero_optimization"]
        assert zero["stage"] in (2, 3)


def test_train_config_errors_by_message(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.0.lr: Input should be greater than 0"):
        load_train_config(None, ["stages=[{lr: 0}]"])
    with pytest.raises(ConfigError, match=r"per_device_batch_sise: Extra inputs are not permitted"):
        load_train_config(None, ["per_device_batch_sise=4"])
    with pytest.raises(FileNotFoundError, match="train config file 'x.yaml' does not exist"):
        load_train_config("x.yaml")
    assert isinstance(load_train_config(None), TrainConfig)


def test_train_config_base_and_overrides_equal_the_command_line_they_write_down():
    """configs/train/mix_tiny_deft25.yaml (base: mix_tiny.yaml + overrides) is the H200 run's command."""
    from_file = load_train_config(ROOT / "configs/train/mix_tiny_deft25.yaml")
    by_hand = load_train_config(ROOT / "configs/train/mix_tiny.yaml", [
        "num_workers=14", "output_dir=runs/mix_tiny_deft25", "stages.0.epochs=3", "stages.0.retention_hold_ratio=0.3",
        "stages.0.retention_ramp_ratio=0.3", "model.pipeline.stages.1.retention_ratio=0.25"])
    assert from_file == by_hand
    assert from_file.model["pipeline"]["stages"][1] == {**by_hand.model["pipeline"]["stages"][1], "retention_ratio": 0.25}
    # command-line overrides still come last
    assert load_train_config(ROOT / "configs/train/mix_tiny_deft25.yaml", ["stages.0.epochs=1"]).stages[0].epochs == 1


def test_train_config_base_merges_mappings_replaces_lists_and_chains(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("seed: 1\nsave_steps: 7\ndata: {type: easyvqa, limit: 5}\n"
                                     "stages: [{lr: 0.5}, {lr: 0.25}]\noverrides: [log_steps=3, seed=2]\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ndata: {limit: 9}\nstages: [{lr: 0.1}]\noverrides: [seed=4]\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nsave_steps: 8\n")
    cfg = load_train_config(tmp_path / "c.yaml")
    assert (cfg.seed, cfg.save_steps, cfg.log_steps) == (4, 8, 3)  # b's overrides after a's
    assert (cfg.data.type, cfg.data.limit) == ("easyvqa", 9)  # mapping merged key by key
    assert [s.lr for s in cfg.stages] == [0.1]  # a list is replaced whole


def test_train_config_base_errors_name_the_file(tmp_path):
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match=r"train config '.*loop1.yaml' is its own base: .*loop1.yaml -> .*loop2.yaml -> .*loop1.yaml"):
        load_train_config(tmp_path / "loop1.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"train config file '.*gone.yaml' \(the base of '.*orphan.yaml'\) does not exist"):
        load_train_config(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text("overrides: seed=3\n")
    with pytest.raises(ConfigError, match=r"'overrides' must be a list of 'key.path=value' strings, got 'seed=3'"):
        load_train_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"train config '.*list.yaml' must be a mapping, got list"):
        load_train_config(tmp_path / "list.yaml")


def _describe(m: LlavaDeftForCausalLM, clip) -> dict:
    """What a model config can change, as comparable values (``clip``: a video file to sample)."""
    return {
        "video_frames": m.load_video(clip).indices.tolist(),
        "video_tokens_per_frame": m.media_tokens_per_frame,
        "encoder": type(m.vision).__name__,
        "vision_params": sum(p.numel() for p in m.vision.parameters()),
        "vision_layer": getattr(m.vision, "layer", None),
        "transform": repr(m.image_transform),
        "vision_trainable": any(p.requires_grad for p in m.vision.parameters()),
        "projector": repr(m.projector),
        "llm_hidden": m.llm.hidden_size,
        "llm_trainable": any(p.requires_grad for p in m.llm.parameters()),
        "attn": m.llm.config._attn_implementation,
        "pipeline": m.pipeline.names,
        "pipeline_config": repr(m.pipeline.config),
        "vocab": len(m.tokenizer),
        "max_length": m.config.max_length,
        "audio_tokens": None if m.audio is None else m.audio_processor.num_tokens(16000),
        "audio_params": None if m.audio is None else sum(p.numel() for p in m.audio.parameters()),
        "audio_weights": None if m.audio is None else float(m.audio.encoder.conv1.weight.detach().sum()),
        "audio_trainable": None if m.audio is None else any(p.requires_grad for p in m.audio.parameters()),
        "media_limits": m.processors.media.limits,  # what the loaders check (tests/test_hardening.py: each refuses)
    }


def _changes(tmp_path):
    from llava_deft.model.llm import build_llm
    from llava_deft.model.tokenizer import load_tokenizer

    llm_dir = tmp_path / "llm"
    tok = load_tokenizer()
    build_llm({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1}, vocab_size=len(tok)).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)  # llm.path without tokenizer: takes the LLM directory's own
    tok_dir = tmp_path / "tok"
    tok.add_tokens(["<extra_word>"])
    tok.save_pretrained(tok_dir)
    from llava_deft.encoders.audio import AudioEncoder

    torch.manual_seed(1)
    AudioEncoder().save_weights(tmp_path / "audio.safetensors")
    clip = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    hf_clip = {"vision": {"backend": "hf_clip"}}
    return {
        "vision.backend": ({"vision": {"backend": "open_clip", "name": "ViT-B-32", "kwargs": clip}}, "encoder"),
        "vision.path": ({"vision": {"backend": "hf_clip", "path": str(tmp_path / "clip")}}, "vision_params", hf_clip),
        "vision.vision_feature_layer": ({"vision": {"backend": "hf_clip", "vision_feature_layer": -1}}, "vision_layer", hf_clip),
        "vision.vision_feature_select_strategy": ({"vision": {"backend": "hf_clip", "vision_feature_select_strategy": "full"}},
                                                  "video_tokens_per_frame", hf_clip),
        "vision.image_processor": ({"vision": {"backend": "hf_clip", "image_processor": {
            "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3}}},
            "transform", hf_clip),
        "vision.name": ({"vision": {"name": "deit_tiny_patch16_224"}}, "transform"),
        "vision.kwargs": ({"vision": {"kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2}}}, "vision_params"),
        "vision.feature_layer": ({"vision": {"feature_layer": -2}}, "vision_layer"),
        "vision.freeze": ({"vision": {"freeze": True}}, "vision_trainable"),
        "projector.type": ({"projector": {"type": "linear"}}, "projector"),
        "llm.config": ({"llm": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                           "num_hidden_layers": 1, "num_attention_heads": 2}}}, "llm_hidden"),
        "llm.path": ({"llm": {"path": str(llm_dir)}}, "llm_hidden"),
        "llm.freeze": ({"llm": {"freeze": True}}, "llm_trainable"),
        "llm.attn_implementation": ({"llm": {"attn_implementation": "eager"}}, "attn"),
        "pipeline": ({"pipeline": [{"name": "random"}]}, "pipeline"),
        "tokenizer": ({"tokenizer": str(tok_dir)}, "vocab"),
        "max_length": ({"max_length": 64}, "max_length"),
        "video.num_frames": ({"video": {"num_frames": 4}}, "video_frames"),
        "video.fps": ({"video": {"fps": 2.0}}, "video_frames"),
        "video.max_frames": ({"video": {"max_frames": 3}}, "video_frames"),
        "video.pool_stride": ({"video": {"pool_stride": 2}}, "video_tokens_per_frame"),
        "audio.enabled": ({"audio": {"enabled": True}}, "audio_tokens"),
        # the other audio knobs need enabled: each is compared with audio enabled alone
        "audio.encoder": ({"audio": {"enabled": True, "encoder": {"encoder_layers": 1}}}, "audio_params", {"audio": {"enabled": True}}),
        "audio.weights": ({"audio": {"enabled": True, "weights": str(tmp_path / "audio.safetensors")}}, "audio_weights",
                          {"audio": {"enabled": True}}),
        "audio.pool_stride": ({"audio": {"enabled": True, "pool_stride": 2}}, "audio_tokens", {"audio": {"enabled": True}}),
        "audio.freeze": ({"audio": {"enabled": True, "freeze": True}}, "audio_trainable", {"audio": {"enabled": True}}),
        "use_deft": ({"use_deft": True}, "pipeline"),
        **{f"limits.{k}": ({"limits": {k: v}}, "media_limits") for k, v in (  # values that still take the clip
            ("max_image_pixels", 1000), ("max_video_seconds", 60), ("max_video_frame_pixels", 10**5), ("max_audio_seconds", 60))},
        # the deft_* knobs need use_deft: each is compared with use_deft alone
        "deft_semantic_dim": ({"use_deft": True, "deft_semantic_dim": 64}, "pipeline_config", {"use_deft": True}),
        "deft_retention_ratio": ({"use_deft": True, "deft_retention_ratio": 0.25}, "pipeline_config", {"use_deft": True}),
        "deft_enable_rtd": ({"use_deft": True, "deft_enable_rtd": False}, "pipeline", {"use_deft": True}),
        "deft_alpha_var": ({"use_deft": True, "deft_alpha_var": 0.5}, "pipeline_config", {"use_deft": True}),
        "deft_rtd_bottleneck_ratio": ({"use_deft": True, "deft_rtd_bottleneck_ratio": 8}, "pipeline_config", {"use_deft": True}),
    }


def test_every_model_config_key_changes_the_model(tmp_path):
    """Each leaf key of ModelConfig (vision.weights is covered in test_model) changes what is built."""
    import numpy as np

    from llava_deft.tasks.video_shapes import write_clip

    changes = _changes(tmp_path)
    clip = tmp_path / "clip.mp4"
    write_clip(np.zeros((24, 64, 64, 3), dtype=np.uint8), clip, fps=8)  # 3 s: fps=2 samples 6 frames
    from llava_deft.config.base import nested_model

    nested = {k: nested_model(f.annotation) for k, f in ModelConfig.model_fields.items()}  # vision: VisionConfig | None
    leaves = {f"{k}.{s}" for k, m in nested.items() if m is not None for s in m.model_fields} | {
        k for k, m in nested.items() if m is None}
    assert leaves - {"vision.weights"} == set(changes), "a config key has no behaviour test (or a test has no key)"
    for key, (override, field, *base_override) in changes.items():
        torch.manual_seed(0)
        base = _describe(LlavaDeftForCausalLM(base_override[0] if base_override else None), clip)
        torch.manual_seed(0)
        changed = _describe(LlavaDeftForCausalLM(override), clip)
        assert changed[field] != base[field], f"{key} did not change {field}"


def test_audio_knobs_need_enabled_and_valid_encoder_keys():
    with pytest.raises(ConfigError, match=r"audio \['pool_stride', 'freeze'\] take effect only with audio.enabled: true"):
        load_model_config({"audio": {"pool_stride": 2, "freeze": True}})
    with pytest.raises(ConfigError, match=r"audio.encoder: .*unknown audio config key\(s\) \['d_modle'\]"):
        load_model_config({"audio": {"enabled": True, "encoder": {"d_modle": 64}}})
    cfg = load_model_config({"audio": {"enabled": True, "encoder": {"sampling_rate": 8000, "chunk_length": 2}}})
    assert cfg.audio.sampling_rate() == 8000 and load_model_config(None).audio.sampling_rate() == 16000


def test_deft_switches_conflicts_are_errors():
    with pytest.raises(ConfigError, match=r"\['deft_alpha_var'\] take effect only with use_deft: true"):
        load_model_config({"deft_alpha_var": 0.2})
    with pytest.raises(ConfigError, match="use_deft builds the DeFT pipeline itself: remove `pipeline`"):
        load_model_config({"use_deft": True, "pipeline": [{"name": "random"}]})
    cfg = load_model_config({"use_deft": True, "deft_retention_ratio": 0.11, "deft_enable_rtd": False})
    assert cfg.pipeline_config() == {"stages": [
        {"name": "sam", "semantic_dim": 512}, {"name": "fgcs", "retention_ratio": 0.11, "alpha_var": 0.1}]}


def test_a_missing_model_file_names_the_train_config_that_names_it(tmp_path):
    (tmp_path / "t.yaml").write_text("model: nope.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"model config file '.*nope\.yaml' \(the 'model:' of train config '.*t\.yaml'\) does not exist"):
        load_train_config(tmp_path / "t.yaml")
