"""transformers' LLaVA checkpoints: a tiny ``LlavaForConditionalGeneration`` (CLIP 2 layers, Llama 2
layers with GQA) saved by transformers loads as our model with HF's logits (single file, sharded, the
key layouts of transformers 4.x and 5, the ``full`` strategy), exports back, and bad directories fail
with typed errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from llava_deft.config.model import load_model_config
from llava_deft.encoders.image import build_image_encoder
from llava_deft.errors import CheckpointError, ConfigError, PickleCheckpointError, UnsupportedCheckpointError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.hf_llava import export_hf_llava
from llava_deft.model.tokenizer import load_tokenizer

VISION = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
PROMPT = "<image>\nwhat color is the shape?"
# llava-hf/llava-1.5-7b-hf's chat template: content as typed parts
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _hf_llava(strategy: str = "default") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tok = load_tokenizer()
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=VISION, text_config={**TEXT, "vocab_size": len(tok)},
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    return model, processor


def _save(model, processor, out, **kw):
    model.save_pretrained(out, **kw)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf():
    return _hf_llava()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


@torch.no_grad()
def _hf_logits(model, processor, image):
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    return model(**inputs).logits, inputs


@torch.no_grad()
def _our_logits(ours, image):
    """Our forward on the single-placeholder prompt; the splice expands it to the image's tokens."""
    enc = ours.tokenizer(PROMPT, return_tensors="pt")
    return ours(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                pixel_values=ours.image_transform(image)[None], media_counts=torch.tensor([1])).logits


def _assert_same_logits(ours, hf_logits, hf_inputs, image):
    logits = _our_logits(ours, image)
    n_image = int((hf_inputs["input_ids"] == ours.image_token_id).sum())
    assert n_image == ours.media_tokens_per_image and logits.shape == hf_logits.shape
    text = hf_inputs["input_ids"][0] != ours.image_token_id  # the prompt's text positions
    assert_close(logits[0, text], hf_logits[0, text])
    assert_close(logits, hf_logits)  # and every position: the image's tokens sit where HF expands them


@pytest.mark.parametrize("shards", [None, "150KB"], ids=["single_file", "sharded"])
def test_hf_llava_dir_gives_hf_logits(hf, image, tmp_path, shards):
    model, processor = hf
    out = _save(model, processor, tmp_path / "llava", **({"max_shard_size": shards} if shards else {}))
    assert (out / "model.safetensors.index.json").is_file() == (shards is not None)
    if shards:
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ours = LlavaDeftForCausalLM.from_pretrained(out).eval()
    cfg = ours.config
    assert (cfg.vision.backend, cfg.projector.type, cfg.max_length) == ("hf_clip", "mlp2x_gelu", 256)
    assert cfg.vision.vision_feature_layer == -2 and ours.pipeline.names == []
    assert ours.vision.grid == (4, 4) and ours.llm.vocab_size == len(ours.tokenizer)
    hf_logits, inputs = _hf_logits(model, processor, image)
    assert torch.equal(ours.image_transform(image)[None], inputs["pixel_values"])
    _assert_same_logits(ours, hf_logits, inputs, image)


LAYOUTS = {
    # transformers 4.x files (llava-hf/llava-1.5-7b-hf): CLIPVisionModel still had its vision_model.
    "4.x": lambda k: (k.replace("model.vision_tower.", "vision_tower.vision_model.")
                      .replace("model.multi_modal_projector.", "multi_modal_projector.")
                      .replace("model.language_model.", "language_model.model.")
                      .replace("lm_head.", "language_model.lm_head.")),
    # transformers 5's module names (a state dict saved as it is, e.g. safetensors.torch.save_file)
    "module_names": lambda k: k,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_key_layouts_load(hf, image, tmp_path, layout):
    """Files name the weights three ways: transformers 5.24's save_pretrained writes vision_tower.*,
    multi_modal_projector.*, language_model.model.*, language_model.lm_head.* (the single-file test);
    4.x's had vision_tower.vision_model.*; the modules are model.vision_tower.*, ..., lm_head.*.
    transformers 5 loads each (so each is a real layout), and so do we."""
    model, processor = hf
    out = _save(model, processor, tmp_path / "llava")
    rename = LAYOUTS[layout]
    save_file({rename(k): v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert [k for k, v in model.state_dict().items() if not torch.equal(reloaded[k], v)] == []
    hf_logits, inputs = _hf_logits(model, processor, image)
    _assert_same_logits(LlavaDeftForCausalLM.from_pretrained(out).eval(), hf_logits, inputs, image)


def test_full_strategy_keeps_cls_as_a_strip(image, tmp_path):
    model, processor = _hf_llava("full")
    out = _save(model, processor, tmp_path / "llava")
    ours = LlavaDeftForCausalLM.from_pretrained(out).eval()
    assert ours.vision.grid == (1, 17) and ours.media_tokens_per_image == 17  # 16 patches + CLS, first
    hf_logits, inputs = _hf_logits(model, processor, image)
    _assert_same_logits(ours, hf_logits, inputs, image)
    with pytest.raises(ConfigError, match="vision_feature_select_strategy 'full' keeps the CLS token"):
        load_model_config({"vision": {"backend": "hf_clip", "vision_feature_select_strategy": "full"},
                           "video": {"pool_stride": 2}})


def test_export_reloads_in_transformers_with_the_same_logits(hf, image, tmp_path):
    model, processor = hf
    ours = LlavaDeftForCausalLM.from_pretrained(_save(model, processor, tmp_path / "llava")).eval()
    out = export_hf_llava(ours, tmp_path / "export", max_shard_size="150KB")
    assert (out / "model.safetensors.index.json").is_file()
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    back_processor = AutoProcessor.from_pretrained(out)
    hf_logits, inputs = _hf_logits(model, processor, image)
    logits, back_inputs = _hf_logits(back, back_processor, image)
    assert torch.equal(back_inputs["input_ids"], inputs["input_ids"])  # <image> expanded to 16 tokens
    assert torch.equal(back_inputs["pixel_values"], inputs["pixel_values"])
    assert_close(logits, hf_logits)
    # and our own format keeps working for an hf_clip model
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["vision"]["backend"] == "hf_clip" and saved["vision"]["image_processor"]["crop_size"] == {"height": 32, "width": 32}
    _assert_same_logits(LlavaDeftForCausalLM.from_pretrained(tmp_path / "ours").eval(), hf_logits, inputs, image)


def test_export_refuses_what_an_hf_llava_cannot_hold(tiny_model, tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match=r"vision.backend is 'timm', an HF llava holds a CLIP tower"):
        export_hf_llava(tiny_model, tmp_path / "x")
    deft = LlavaDeftForCausalLM({"vision": {"backend": "hf_clip"}, "use_deft": True, "deft_semantic_dim": 32})
    with pytest.raises(UnsupportedCheckpointError, match=r"no place for this model's \['pipeline'\] weights.*drop_unsupported=True"):
        export_hf_llava(deft, tmp_path / "x")
    export_hf_llava(deft, tmp_path / "x", drop_unsupported=True)
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "x").config.image_seq_length == 64


@pytest.mark.parametrize("config_json", [True, False], ids=["with_config", "weights_only"])
def test_pickle_only_dir_is_refused_with_the_conversion_command(hf, tmp_path, config_json):
    model, processor = hf
    out = _save(model, processor, tmp_path / "llava")
    (out / "model.safetensors").unlink()
    if not config_json:
        (out / "config.json").unlink()
    (out / "pytorch_model.bin").write_bytes(b"never unpickled")
    cmd = ("python -c \"from transformers import LlavaForConditionalGeneration as M; "
           f"M.from_pretrained('{out}').save_pretrained('OUT', safe_serialization=True)\"")
    with pytest.raises(PickleCheckpointError, match=r"holds its weights only as pickles \(pytorch_model.bin\)") as e:
        LlavaDeftForCausalLM.from_pretrained(out)
    assert cmd in str(e.value)


def test_index_naming_a_missing_shard_is_refused(hf, tmp_path):
    model, processor = hf
    out = _save(model, processor, tmp_path / "llava", max_shard_size="150KB")
    gone = sorted(out.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard\(s\) \['{gone.name}'\] that are not in"):
        LlavaDeftForCausalLM.from_pretrained(out)


def test_what_we_cannot_build_is_a_typed_error_naming_the_key(hf, tmp_path):
    model, processor = hf
    out = _save(model, processor, tmp_path / "llava")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "projector_hidden_act": "relu", "vision_feature_layer": [-2, -1]}))
    with pytest.raises(UnsupportedCheckpointError, match=r"projector_hidden_act is 'relu', llava-deft needs 'gelu'.*"
                                                         r"vision_feature_layer is \[-2, -1\], llava-deft needs one layer"):
        LlavaDeftForCausalLM.from_pretrained(out)
    (out / "config.json").write_text(json.dumps({**cfg, "image_token_index": 7}))
    with pytest.raises(CheckpointError, match="has image_token_id 7 but the tokenizer of .* encodes <image> as id 4"):
        LlavaDeftForCausalLM.from_pretrained(out)


def test_llava_hf_tokenizer_files_string_content_and_unk_padding(tmp_path):
    """A 4.x llava-hf directory keeps its chat template in chat_template.json (typed content parts) and
    may lack a pad token: the template still renders our string content, padding uses unk."""
    tok = load_tokenizer()
    tok.chat_template = None
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_15_TEMPLATE}))
    with pytest.raises(ValueError, match="missing a pad token"):
        load_tokenizer(tmp_path)
    loaded = load_tokenizer(tmp_path, pad_from_unk=True)
    assert loaded.pad_token == "<unk>"
    messages = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "red"}]
    assert loaded.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == "USER: <image>\nwhat? ASSISTANT:"
    enc = loaded.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert loaded.decode(answer).strip() == "red"
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    assert loaded.apply_chat_template(typed, tokenize=False, add_generation_prompt=True) == "USER: <image>\nwhat? ASSISTANT:"


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPModel"])
def test_hf_clip_encoder_from_a_clip_directory_matches_transformers(tmp_path, image, kind):
    """vision.path: a CLIPVisionModel directory, or a whole CLIP's (openai/clip-vit-large-patch14-336's kind)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})
    if kind == "CLIPModel":
        text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        whole = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=16)).eval()
        whole.save_pretrained(tmp_path)
        clip = whole.vision_model
    else:
        clip = CLIPVisionModel(vision).eval()
        clip.save_pretrained(tmp_path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3)
    images.save_pretrained(tmp_path)
    enc, transform = build_image_encoder(load_model_config({"vision": {"backend": "hf_clip", "path": str(tmp_path),
                                                                       "vision_feature_layer": 1}}).vision)
    pixels = images(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(transform(image)[None], pixels)
    with torch.no_grad():
        ref = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[1][:, 1:]
        assert_close(enc.eval()(pixels), ref)
    assert (enc.grid, enc.width, enc.image_size) == ((4, 4), 32, (32, 32))


def test_vision_keys_of_another_backend_are_errors():
    with pytest.raises(ConfigError, match=r"vision \['name'\] apply only to backends timm and open_clip, not 'hf_clip'"):
        load_model_config({"vision": {"backend": "hf_clip", "name": "ViT-L-14"}})
    with pytest.raises(ConfigError, match=r"vision \['image_processor', 'vision_feature_layer'\] apply only to backend hf_clip, not 'timm'"):
        load_model_config({"vision": {"vision_feature_layer": -1, "image_processor": {}}})
    with pytest.raises(ConfigError, match=r"vision.path \(a CLIP directory\) and vision.kwargs .* exclude each other"):
        load_model_config({"vision": {"backend": "hf_clip", "path": "clip", "kwargs": {"image_size": 32}}})
    with pytest.raises(ConfigError, match=r"vision.kwargs: unknown CLIPVisionConfig key\(s\) \['hidden_sise'\]"):
        build_image_encoder(load_model_config({"vision": {"backend": "hf_clip", "kwargs": {"hidden_sise": 32}}}).vision)
    with pytest.raises(ConfigError, match=r"vision.vision_feature_layer 3 is out of range for a CLIP tower with 2 layers"):
        build_image_encoder(load_model_config({"vision": {"backend": "hf_clip", "vision_feature_layer": 3}}).vision)
    with pytest.raises(ConfigError, match=r"vision.image_processor gives \(48, 48\) images but the CLIP tower takes \(64, 64\)"):
        build_image_encoder(load_model_config({"vision": {"backend": "hf_clip", "image_processor": {
            "crop_size": {"height": 48, "width": 48}}}}).vision)


def test_easyvqa_eval_takes_an_hf_llava_dir_with_a_deft_sweep(hf, tmp_path):
    """The README's ``eval/easyvqa.py --model <llava-hf dir> --pipeline configs/pipeline/deft.yaml --retention ...``."""
    from eval import easyvqa

    model, processor = hf
    out = _save(model, processor, tmp_path / "llava")
    rows = easyvqa.main(["--model", str(out), "--pipeline", "configs/pipeline/deft.yaml", "--retention", "1", "0.25",
                         "--limit", "4", "--max-new-tokens", "2", "--out", str(tmp_path / "res"), "--device", "cpu"])
    assert [r["tokens_per_image"] for r in rows] == [16.0, 4.0]
    saved = json.loads((tmp_path / "res" / "easyvqa_test.json").read_text())
    assert saved["pipeline"] == ["sam", "fgcs", "rtd"] and saved["model"] == str(out)
    shutil.rmtree(out)


def test_every_trainable_clip_parameter_gets_a_gradient(image):
    """The layers after vision_feature_layer (and post_layernorm) feed nothing: they stay frozen, even
    after apply_freeze unfreezes the tower, and every other parameter gets a gradient."""
    model = LlavaDeftForCausalLM({"vision": {"backend": "hf_clip"}})
    model.apply_freeze(vision=False, llm=True)
    enc = model.tokenizer(PROMPT + " red", return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"],
                pixel_values=model.image_transform(image)[None], media_counts=torch.tensor([1]))
    out.loss.backward()
    tower = model.vision.model
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in tower.named_parameters() if n.startswith(("encoder.layers.1.", "post_layernorm."))}
    assert [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None] == []
