"""``visionzip`` (pipeline/stages/visionzip.py) and the encoder attention it reads
(``TimmViTEncoder.forward_with_attention``)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline import TokenBatch, build_pipeline
from pipeline.stages.visionzip import VisionZip

D = 16


def ragged(seed: int, lengths=(37, 64, 5, 1), n=64):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    tokens = torch.randn(b, n, D, generator=g)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    attn = torch.rand(b, n, generator=g)
    attn[0, :3] = attn[0, 5]  # ties: the earlier token wins
    layout = torch.stack([torch.ones(b, dtype=torch.long), torch.ones(b, dtype=torch.long), torch.tensor(lengths)], 1)
    return TokenBatch.from_tokens(tokens, mask, layout=layout, encoder_attention=attn)


def reference(tokens, attn, n, ratio, share):
    """VisionZip on one row of ``n`` real tokens, one token at a time: list of (index, token)."""
    total = min(max(math.ceil(n * ratio), 1), n)
    n_dom = min(total, math.ceil(share * total))
    n_ctx = total - n_dom
    order = sorted(range(n), key=lambda i: (-float(attn[i]), i))
    dom = sorted(order[:n_dom])
    rest = [i for i in range(n) if i not in dom]
    out = {i: tokens[i] for i in dom}
    if n_ctx:
        step = max(1, len(rest) // n_ctx)
        centres = [rest[j * step] for j in range(n_ctx)]
        groups = {c: [c] for c in centres}
        unit = [t / t.norm().clamp(min=1e-12) for t in tokens]
        for i in rest:
            if i in groups:
                continue
            sims = [float(unit[i] @ unit[c]) for c in centres]
            groups[centres[sims.index(max(sims))]].append(i)
        for c, members in groups.items():
            out[c] = torch.stack([tokens[m] for m in members]).mean(0)
    return sorted(out.items())


@pytest.mark.parametrize(("ratio", "share"), [(0.25, 54 / 64), (0.111, 54 / 64), (0.5, 0.5), (0.3, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_and_budget(seed, ratio, share):
    batch = ragged(seed)
    stage = VisionZip(retention_ratio=ratio, dominant_share=share)
    out = stage(batch)
    for b, n in enumerate(batch.lengths.tolist()):
        want = reference(batch.tokens[b], batch.encoder_attention[b], n, ratio, share)
        kept = int(out.mask[b].sum())
        assert kept == min(max(math.ceil(n * ratio), 1), n)  # the budget, exactly
        assert out.index[b, :kept].tolist() == [i for i, _ in want]
        torch.testing.assert_close(out.tokens[b, :kept], torch.stack([t for _, t in want]))
        have = torch.cat([out.index[b, :kept], out.pruned.index[b][out.pruned.mask[b]]])
        assert sorted(have.tolist()) == list(range(n))
    assert out.encoder_attention is not None and out.encoder_attention.shape == out.mask.shape


def test_default_counts_are_the_papers():
    tokens = torch.randn(1, 576, D)
    out = VisionZip()(TokenBatch.from_tokens(tokens, layout=(1, 24, 24), encoder_attention=torch.rand(1, 576)))
    assert out.mask.sum().item() == 64
    assert out.stats["visionzip"]["dominant"] == 54 and out.stats["visionzip"]["contextual"] == 10


def test_needs_encoder_attention_or_norm():
    batch = replace(ragged(0), encoder_attention=None)
    with pytest.raises(ValueError, match="must provide it"):
        VisionZip(retention_ratio=0.25)(batch)
    out = VisionZip(retention_ratio=0.25, dominance="norm")(batch)
    # dominance by norm: the highest-norm tokens are kept as they are
    top = batch.tokens[1].norm(dim=-1).argsort(descending=True)[:14]
    assert set(top.tolist()) <= set(out.index[1][out.mask[1]].tolist())
    assert VisionZip().needs_encoder_attention and not VisionZip(dominance="norm").needs_encoder_attention


def manual_block_attention(model, pixels, layer):
    """Reference: run the ViT up to block ``layer`` by hand, then that block's attention weights head by
    head, softmax(q k^T / sqrt(hd)), from the block's own qkv weights. (M, heads, L, L)."""
    x = model.patch_embed(pixels)
    x = model._pos_embed(x)
    x = model.norm_pre(model.patch_drop(x))
    for blk in model.blocks[:layer]:
        x = blk(x)
    blk = model.blocks[layer]
    h = blk.norm1(x)
    w, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
    c = x.shape[-1]
    heads = blk.attn.num_heads
    hd = c // heads
    q = F.linear(h, w[:c], None if bias is None else bias[:c])
    k = F.linear(h, w[c:2 * c], None if bias is None else bias[c:2 * c])
    out = []
    for i in range(heads):
        qi, ki = q[..., i * hd:(i + 1) * hd], k[..., i * hd:(i + 1) * hd]
        out.append(torch.softmax(qi @ ki.transpose(-1, -2) / math.sqrt(hd), dim=-1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("feature_layer", [-1, 1])
@pytest.mark.parametrize("cls", [True, False])
def test_timm_encoder_attention_matches_block_weights(feature_layer, cls):
    from llava_deft.encoders.image import TimmViTEncoder

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4}
    if not cls:
        kwargs.update(class_token=False, global_pool="avg")
    enc = TimmViTEncoder("vit_tiny_patch16_224", kwargs, feature_layer=feature_layer).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = enc(pixels)
        tokens, attn = enc.forward_with_attention(pixels)
        weights = manual_block_attention(enc.model, pixels, enc.layer).mean(1)  # (M, L, L) over heads
    assert torch.equal(tokens, plain), "asking for attention must not change the encoder's output"
    prefix = enc.model.num_prefix_tokens
    want = (weights[:, 0] if cls else weights.mean(1))[:, prefix:]
    assert attn.shape == (2, 16)
    torch.testing.assert_close(attn, want, rtol=1e-4, atol=1e-6)


def test_other_backends_say_so():
    from llava_deft.encoders.image import ImageEncoder, OpenClipVisualEncoder

    enc = OpenClipVisualEncoder.__new__(OpenClipVisualEncoder)
    ImageEncoder.__init__(enc)
    with pytest.raises(NotImplementedError, match="'open_clip' image encoder does not provide encoder attention"):
        enc.forward_with_attention(torch.zeros(1, 3, 8, 8))


def test_tiny_model_generates_with_visionzip():
    from PIL import Image

    from llava_deft.data import build_collator
    from llava_deft.model import LlavaDeftForCausalLM

    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"pipeline": {"stages": [{"name": "visionzip", "retention_ratio": 0.25}]}}).eval()
    assert model.needs_encoder_attention()
    pixels = torch.randn(2, 3, *model.vision.image_size)
    batch = model.encode_images(pixels)
    _, want = model.vision.forward_with_attention(pixels)
    torch.testing.assert_close(batch.encoder_attention, want)
    pic = Image.new("RGB", (40, 40), (200, 30, 30))
    items = [
        {"id": "a", "messages": [{"role": "user", "content": "<image>\nwhat shape?"}, {"role": "assistant", "content": "x"}], "images": [pic]},
        {"id": "b", "messages": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}], "images": []},
        {"id": "c", "messages": [{"role": "user", "content": "<image>\n<image>\nsame?"}, {"role": "assistant", "content": "no"}], "images": [pic, pic]},
    ]
    inputs = build_collator(replace(model.processors, max_length=512), generation=True)(items)
    with torch.no_grad():
        new, info = model.generate(**inputs, max_new_tokens=4, return_info=True)
    assert new.shape[0] == len(items)
    n = model.media_tokens_per_image
    assert info.stats["visionzip"]["tokens_out"] == math.ceil(0.25 * n)
    # a pipeline whose stages do not ask for it leaves the field unset
    plain = LlavaDeftForCausalLM({"pipeline": {"stages": [{"name": "visionzip", "dominance": "norm"}]}}).eval()
    assert not plain.needs_encoder_attention() and plain.encode_images(pixels).encoder_attention is None


def test_yaml_pipeline_builds():
    from pathlib import Path

    pipe = build_pipeline(str(Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "visionzip.yaml"), dim=D)
    assert pipe.names == ["visionzip"] and pipe.stages[0].retention_ratio == 0.111


def test_video_rows_carry_pooled_frame_attention():
    from llava_deft.encoders.video import pool_frame_tokens
    from llava_deft.model import LlavaDeftForCausalLM

    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"pipeline": {"stages": [{"name": "visionzip", "retention_ratio": 0.25}]},
                                  "video": {"pool_stride": 2}}).eval()
    frames = torch.randn(5, 3, *model.vision.image_size)
    counts = torch.tensor([2, 3])
    with torch.no_grad():
        batch = model.encode_videos(frames, counts)
        _, attn = model.vision.forward_with_attention(frames)
    pooled = pool_frame_tokens(attn.unsqueeze(-1), model.vision.grid, 2)[0][..., 0]  # (F, n)
    n = pooled.shape[1]
    assert batch.encoder_attention.shape == batch.mask.shape
    torch.testing.assert_close(batch.encoder_attention[0, : 2 * n], pooled[:2].flatten())
    torch.testing.assert_close(batch.encoder_attention[1, : 3 * n], pooled[2:].flatten())
    assert (batch.encoder_attention[~batch.mask] == 0).all()
    out = model.pipeline(batch)
    assert out.mask.sum(1).tolist() == [math.ceil(0.25 * 2 * n), math.ceil(0.25 * 3 * n)]
