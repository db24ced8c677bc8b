"""LlavaDeftForCausalLM: splicing, labels, errors, save/load, encoders, freezing, batched generation."""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from llava_deft.config import load_model_config
from llava_deft.data import build_collator
from llava_deft.encoders.image import build_image_encoder
from llava_deft.errors import CheckpointError, ConfigError, MediaCountMismatchError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.splice import IGNORE_INDEX
from tests.conftest import TINY_PIPE


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def samples():
    return [
        {"id": "a", "messages": [{"role": "user", "content": "<image>\nwhat shape is this?"}, {"role": "assistant", "content": "circle"}], "images": [image(0)]},
        {"id": "b", "messages": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}], "images": []},
        {"id": "c", "messages": [{"role": "user", "content": "<image>\n<image>\nsame color?"}, {"role": "assistant", "content": "no"}], "images": [image(1), image(2)]},
    ]


def collate(model, items, generation=False):
    c = build_collator(replace(model.processors, max_length=512), generation=generation)
    return c(items)


def test_forward_shapes_and_label_masking(tiny_model):
    batch = collate(tiny_model, samples())
    sp, aux, stats = tiny_model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 pixel_values=batch["pixel_values"], media_counts=batch["media_counts"])
    kept = 16  # ceil(0.25 * 64)
    n_text = batch["attention_mask"].sum(1)
    assert sp.attention_mask.sum(1).tolist() == (n_text + torch.tensor([1, 0, 2]) * (kept - 1)).tolist()
    assert sp.media_positions.sum(1).tolist() == [kept, 0, 2 * kept]
    assert torch.all(sp.labels[sp.media_positions] == IGNORE_INDEX)
    # labels are exactly the collator's labels, moved past the media spans
    assert sorted(sp.labels[sp.labels != IGNORE_INDEX].tolist()) == sorted(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist())
    assert stats["fgcs"]["tokens_out"] == kept
    out = tiny_model(**batch)
    assert out.logits.shape[:2] == sp.embeds.shape[:2] and torch.isfinite(out.loss)


def test_media_count_mismatch_names_sample(tiny_model):
    batch = collate(tiny_model, samples())
    with pytest.raises(MediaCountMismatchError, match=r"sample 'c'.*2 <image> placeholder\(s\) but 1 media"):
        tiny_model(**{**batch, "media_counts": torch.tensor([1, 0, 1])})


def test_text_only_batch_runs_every_module(tiny_model):
    """ZeRO-3 needs every rank to run the same modules: a text-only batch still touches the encoder."""
    model = LlavaDeftForCausalLM({"pipeline": TINY_PIPE}).train()
    batch = collate(model, [samples()[1]])
    assert batch["pixel_values"] is None
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} was not in the graph of a text-only batch"


def test_freeze_stage1(tiny_model):
    model = LlavaDeftForCausalLM({"pipeline": TINY_PIPE, "llm": {"freeze": True}, "vision": {"freeze": True}})
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    assert all(p.requires_grad for p in model.pipeline.parameters())


def test_save_load_round_trip(tiny_model, tmp_path):
    batch = collate(tiny_model, samples())
    tiny_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer").is_dir()
    loaded = LlavaDeftForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, tiny_model(**batch).logits)
    # a different pipeline for a training-free sweep keeps the trained weights of everything else
    swapped = LlavaDeftForCausalLM.from_pretrained(tmp_path / "m", pipeline=[{"name": "random", "retention_ratio": 0.5}])
    assert swapped.pipeline.names == ["random"]
    torch.testing.assert_close(swapped.projector[0].weight, tiny_model.projector[0].weight)


def test_load_errors(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LlavaDeftForCausalLM.from_pretrained(tmp_path)
    tiny_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        LlavaDeftForCausalLM.from_pretrained(tmp_path / "m")


def test_config_errors_by_message():
    with pytest.raises(ConfigError, match=r"vision.nmae: Extra inputs are not permitted \(allowed keys: \['backend', 'feature_layer'"):
        load_model_config({"vision": {"nmae": "x"}})
    with pytest.raises(ConfigError, match=r"projector.type: Input should be 'linear' or 'mlp2x_gelu'"):
        load_model_config({"projector": {"type": "mlp3x"}})
    with pytest.raises(ConfigError, match=r"pipeline.stages.0.fgcs.retention_ratio: Input should be less than or equal to 1"):
        load_model_config({"pipeline": [{"name": "fgcs", "retention_ratio": 1.5}]})
    with pytest.raises(ConfigError, match="needs 'model_type'"):
        load_model_config({"llm": {"config": {"hidden_size": 8}}})
    with pytest.raises(FileNotFoundError, match="model config file 'nope.yaml' does not exist"):
        load_model_config("nope.yaml")
    cfg = load_model_config(None, overrides=["projector.type=linear", "max_length=64"])
    assert cfg.projector.type == "linear" and cfg.max_length == 64


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_types_and_feature_layer(kind):
    m = LlavaDeftForCausalLM({"projector": {"type": kind}, "vision": {"feature_layer": -2}})
    n_linear = sum(isinstance(x, torch.nn.Linear) for x in m.projector.modules())
    assert n_linear == (1 if kind == "linear" else 2)
    assert m.vision.layer == 0  # -2 of a 2-block ViT


def test_open_clip_encoder_and_local_weights(tmp_path):
    cfg = load_model_config({"vision": {"backend": "open_clip", "name": "ViT-B-32", "kwargs": {
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}}}).vision
    enc, tf = build_image_encoder(cfg)
    assert enc.grid == (4, 4) and enc(tf(image(0))[None]).shape == (1, 16, 64)
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(tmp_path / "v.safetensors"))
    enc2, _ = build_image_encoder(cfg.model_copy(update={"weights": str(tmp_path / "v.safetensors")}))
    x = tf(image(1))[None]
    torch.testing.assert_close(enc2.eval()(x), enc.eval()(x))


def test_timm_weights_load_and_reject_pickles(tmp_path):
    cfg = load_model_config(None).vision
    enc, tf = build_image_encoder(cfg)
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(tmp_path / "v.safetensors"))
    enc2, _ = build_image_encoder(cfg.model_copy(update={"weights": str(tmp_path / "v.safetensors")}))
    x = tf(image(0))[None]
    torch.testing.assert_close(enc2.eval()(x), enc.eval()(x))
    (tmp_path / "v.bin").write_bytes(b"not a pickle we would ever load")
    with pytest.raises(CheckpointError, match="must be a .safetensors file"):
        build_image_encoder(cfg.model_copy(update={"weights": str(tmp_path / "v.bin")}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_encoder(cfg.model_copy(update={"weights": str(tmp_path / "missing.safetensors")}))


def test_batched_generate_equals_one_at_a_time(tiny_model):
    items = samples()
    batch = collate(tiny_model, items, generation=True)
    together = tiny_model.generate(**batch, max_new_tokens=6)
    for i, item in enumerate(items):
        one = tiny_model.generate(**collate(tiny_model, [item], generation=True), max_new_tokens=6)
        n = one.shape[1]
        assert torch.equal(together[i, :n], one[0]), f"sample {item['id']} differs when batched"
        assert torch.all(together[i, n:] == tiny_model.tokenizer.pad_token_id)


def test_inference_api(tiny_model, tmp_path):
    import llava_deft

    tiny_model.save_pretrained(tmp_path / "m")
    image(3).save(tmp_path / "x.png")
    model = llava_deft.load_model(tmp_path / "m", device="cpu")
    one = model.generate("what shape?", images=[tmp_path / "x.png"], max_new_tokens=4)
    many = model.generate(["what shape?", "say yes"], images=[[tmp_path / "x.png"], []], max_new_tokens=4)
    assert isinstance(one, str) and many[0] == one
    with pytest.raises(FileNotFoundError, match="image '.*nope.png' does not exist"):
        model.generate("q", images=[tmp_path / "nope.png"])
    with pytest.raises(MediaCountMismatchError, match="2 <image> placeholder"):
        model.generate("<image><image> q", images=[tmp_path / "x.png"])


def test_nothing_reads_the_network(tmp_path, monkeypatch):
    """Building, saving, loading and generating never open a connection (no hub on these machines)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = LlavaDeftForCausalLM({"pipeline": TINY_PIPE}).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = LlavaDeftForCausalLM.from_pretrained(tmp_path / "m").eval()
    out = loaded.generate(**collate(loaded, samples(), generation=True), max_new_tokens=2)
    assert out.shape[0] == 3
