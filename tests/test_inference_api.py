"""The Python inference API: streaming, chat, image inputs, per-call pipeline / retention, statistics and
kept indices, the kept-tokens overlay, and max_new_tokens against the LLM's context."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from llava_deft.errors import ContextLengthError, InvalidArgumentError, UnsupportedInputError
from llava_deft.inference import LlavaDeft, as_image
from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm, generate_from_embeds
from llava_deft.overlay import GAP, HIGHLIGHT, TITLE_HEIGHT, cell_edges

TOKENS = 64  # the tiny model's 8x8 patch grid
HYBRID = {"stages": [{"name": "sam", "semantic_dim": 32}, {"name": "fgcs", "retention_ratio": 0.25, "hidden_dim": 32},
                     {"name": "rtd", "mode": "hybrid", "recover_ratio": 0.25}]}


@pytest.fixture(scope="module")
def api(tiny_model):
    return LlavaDeft(tiny_model, device="cpu")


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def fgcs_ratio(api) -> float:
    return api.model.pipeline.stages[1].retention_ratio


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 7, "temperature": 0.8, "top_k": 50}])
def test_stream_pieces_join_to_the_generated_text(api, sampling):
    image = picture(1)
    text = api.generate("what is this?", images=[image], max_new_tokens=24, **sampling)
    stream = api.stream("what is this?", images=[image], max_new_tokens=24, **sampling)
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == text
    assert stream.info.media[0][0].total == TOKENS


def test_stream_refuses_a_batch_and_stops_when_closed(api):
    with pytest.raises(InvalidArgumentError, match="stream takes one prompt"):
        api.stream(["a", "b"])
    with pytest.raises(InvalidArgumentError, match="retention=2 is out of range"):  # raised by the iteration
        list(api.stream("q", retention=2))
    stream = api.stream("what?", images=[picture(2)], max_new_tokens=200, retention=0.5)
    next(stream)
    stream.close()
    assert not stream._thread.is_alive() and stream.info is None  # stopped before the end
    assert fgcs_ratio(api) == 0.25  # the per-call retention was undone in the generating thread


def test_generate_from_embeds_feeds_a_streamer_each_new_token():
    lm = DecoderLM(build_llm({**TINY_LLM, "num_hidden_layers": 1}, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, 6))
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    rec = Recorder()
    out = generate_from_embeds(lm, lm.embed(ids), mask, pos, 5, eos_token_id=[], pad_token_id=0, streamer=rec)
    assert rec.puts == [[t] for t in out[0].tolist()] and rec.ended == 1
    with pytest.raises(ValueError, match="batch size 1"):
        generate_from_embeds(lm, lm.embed(ids.repeat(2, 1)), mask.repeat(2, 1), pos.repeat(2, 1), 2,
                             eos_token_id=[], pad_token_id=0, streamer=Recorder())


# ------------------------------------------------------------------------------------------ chat
def spy_generate(monkeypatch, api) -> list[dict]:
    calls = []
    original = api.model.generate

    def spy(**kw):
        calls.append(kw)
        return original(**kw)

    monkeypatch.setattr(api.model, "generate", spy)
    return calls


def test_chat_equals_generate_on_the_hand_built_template(api, monkeypatch):
    image = picture(3)
    messages = [{"role": "user", "content": "what shape?"}, {"role": "assistant", "content": "circle"},
                {"role": "user", "content": "what color?"}]
    calls = spy_generate(monkeypatch, api)
    answer = api.chat(messages, images=[image], system="Answer in one word.", max_new_tokens=6)
    tok = api.tokenizer
    text = ("<s>Answer in one word.\nUSER: <image>\nwhat shape?\nASSISTANT: circle</s>\n"
            "USER: what color?\nASSISTANT:")
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert calls[0]["input_ids"][0].tolist() == expected
    ids = torch.tensor([expected])
    pixels = api.processors.image_transform(image)[None]
    out = api.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             media_counts=torch.tensor([1]), max_new_tokens=6)
    assert answer == tok.decode(out[0], skip_special_tokens=True).strip()


def test_generate_with_a_system_prompt_is_a_one_turn_chat(api, monkeypatch):
    calls = spy_generate(monkeypatch, api)
    one = api.generate("say yes", system="Be brief.", max_new_tokens=5)
    assert one == api.chat([{"role": "user", "content": "say yes"}], system="Be brief.", max_new_tokens=5)
    text = api.tokenizer.decode(calls[0]["input_ids"][0])
    assert text == "<s>Be brief.\nUSER: say yes\nASSISTANT:"
    assert api.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say yes"}],
                    max_new_tokens=5) == one


@pytest.mark.parametrize("messages, system, error, match", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None, InvalidArgumentError,
     r"messages\[1\] is a 'assistant' turn; chat answers the last user turn"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}], None,
     InvalidArgumentError, r"a system message at messages\[1\]"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "s", InvalidArgumentError,
     "a system message besides system="),
    ([{"role": "bot", "content": "q"}], None, UnsupportedInputError, r"messages\[0\] = .*'role' one of"),
    ([{"role": "user", "content": 3}], None, UnsupportedInputError, r"'content' a string"),
    ([], None, UnsupportedInputError, "messages must be a non-empty list"),
])
def test_chat_refuses_malformed_conversations(api, messages, system, error, match):
    with pytest.raises(error, match=match):
        api.chat(messages, system=system)


# ------------------------------------------------------------------------------------------ image inputs
def test_every_image_form_gives_the_same_pixels_and_answer(api, tmp_path):
    image = picture(4)
    image.save(tmp_path / "x.png")
    array = np.asarray(image)  # read-only, as PIL gives it: a form users pass
    tensor = torch.from_numpy(array.copy())  # torch wants a writable buffer
    forms = [tmp_path / "x.png", str(tmp_path / "x.png"), image, array, tensor,
             tensor.permute(2, 0, 1), tensor.permute(2, 0, 1).float() / 255,
             torch.from_numpy(array).float() / 255]
    batches = [api.build_batch(["q"], images=[[f]]) for f in forms]
    for b in batches[1:]:
        torch.testing.assert_close(b["pixel_values"], batches[0]["pixel_values"], atol=1e-6, rtol=0)
    answers = {api.generate("what?", images=[f], max_new_tokens=4) for f in forms}
    assert len(answers) == 1


def test_gray_images_become_rgb(api):
    gray = np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)
    assert np.array_equal(np.asarray(as_image(gray)), np.asarray(Image.fromarray(gray).convert("RGB")))
    assert np.array_equal(np.asarray(as_image(torch.from_numpy(gray))), np.asarray(as_image(gray)))


@pytest.mark.parametrize("item, error, match", [
    (3, UnsupportedInputError, r"images\[0\] is a int; an image is a file path, a PIL image"),
    (np.zeros((8, 8, 4), np.uint8), UnsupportedInputError, r"images\[0\] has shape \(8, 8, 4\); an image is"),
    (torch.zeros(2, 8, 8), UnsupportedInputError, r"images\[0\] has shape \(2, 8, 8\)"),
    (torch.zeros(8, 8, 3, dtype=torch.int64), UnsupportedInputError, r"images\[0\] has dtype torch.int64"),
    (np.zeros((8, 8, 3), bool), UnsupportedInputError, r"images\[0\] has dtype bool"),
    (torch.full((3, 8, 8), 2.0), InvalidArgumentError, r"images\[0\] is a float image with values outside \[0, 1\]"),
])
def test_unsupported_images_are_refused_by_name(api, item, error, match):
    with pytest.raises(error, match=match):
        api.generate("q", images=[item])


def test_image_arguments_must_be_lists(api):
    with pytest.raises(UnsupportedInputError, match=r"images must be .* not a bare Image; give images=\[\.\.\.\]"):
        api.generate("q", images=picture())
    with pytest.raises(UnsupportedInputError, match=r"not a bare ndarray; give images=\[\[\.\.\.\], \.\.\.\]"):
        api.generate(["q", "r"], images=[[picture()], np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(UnsupportedInputError, match=r"images\[1\]\[0\] is a int"):
        api.generate(["q", "r"], images=[[picture()], [7]])
    with pytest.raises(UnsupportedInputError, match="prompt must be a string or a non-empty list of strings"):
        api.generate(7)


# ------------------------------------------------------------------------------------------ pipeline / retention
def test_retention_per_call_and_back(api):
    text, info = api.generate("q", images=[picture(6)], retention=0.3, max_new_tokens=3, return_stats=True)
    assert info.stats["fgcs"]["tokens_out"] == math.ceil(0.3 * TOKENS) == 20
    assert len(info.media[0][0].kept) == 20
    assert fgcs_ratio(api) == 0.25
    assert api.model.pipeline.config.stages[1].retention_ratio == 0.25
    _, own = api.generate("q", images=[picture(6)], max_new_tokens=3, return_stats=True)
    assert own.stats["fgcs"]["tokens_out"] == 16


def test_reduction_restores_after_an_error(api):
    own = api.model.pipeline
    with pytest.raises(RuntimeError, match="boom"):
        with api.reduction(pipeline=HYBRID, retention=0.5) as pipe:
            assert api.model.pipeline is pipe is not own and pipe.stages[1].retention_ratio == 0.5
            raise RuntimeError("boom")
    assert api.model.pipeline is own
    with api.reduction(pipeline=HYBRID) as again:
        assert again is pipe and pipe.stages[1].retention_ratio == 0.25  # cached, its own ratio back


@pytest.mark.parametrize("retention", [1.5, 0, -0.1, True, "0.5"])
def test_out_of_range_retention_is_refused(api, retention):
    with pytest.raises(InvalidArgumentError, match=f"retention={retention!r} is out of range"):
        api.generate("q", retention=retention)
    assert fgcs_ratio(api) == 0.25


def test_retention_needs_a_reducer(api):
    with pytest.raises(InvalidArgumentError, match=r"retention=0.5 cannot apply: no stage of the pipeline \[\]"):
        api.generate("q", pipeline={"stages": []}, retention=0.5)


def test_a_per_call_pipeline_keeps_the_learned_stages_weights(api, tiny_model, tmp_path):
    from llava_deft.model import LlavaDeftForCausalLM

    own = tiny_model.pipeline
    with api.reduction(pipeline=HYBRID) as pipe:
        for mine, theirs in zip(pipe.stages[:2], own.stages):
            for (k, x), (_, y) in zip(mine.state_dict().items(), theirs.state_dict().items()):
                assert torch.equal(x, y), k
    # a wider sam changes fgcs's first layer only: fgcs does not fit and keeps its init whole
    wider = {"stages": [{"name": "sam", "semantic_dim": 64}, {"name": "fgcs", "retention_ratio": 0.25, "hidden_dim": 32}]}
    with api.reduction(pipeline=wider) as w:
        assert w.stages[1].state_dict()["saliency.2.weight"].shape == own.stages[1].state_dict()["saliency.2.weight"].shape
        assert not torch.equal(w.stages[1].state_dict()["saliency.2.weight"], own.stages[1].state_dict()["saliency.2.weight"])
    # same answer as loading the checkpoint with that pipeline (fast rtd: its weights are unused)
    fast = {"stages": [*HYBRID["stages"][:2], {"name": "rtd", "mode": "fast"}]}
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = LlavaDeft(LlavaDeftForCausalLM.from_pretrained(tmp_path / "m", pipeline=fast), device="cpu")
    image = picture(7)
    assert api.generate("q", images=[image], pipeline=fast, max_new_tokens=5) == loaded.generate("q", images=[image], max_new_tokens=5)


# ------------------------------------------------------------------------------------------ stats and kept indices
def test_stats_and_kept_indices_per_prompt_and_item(api, tiny_model):
    a, b = picture(8), picture(9)
    texts, info = api.generate(["two images", "none"], images=[[a, b], []], max_new_tokens=3, return_stats=True)
    assert len(texts) == 2 and info.media[1] == []
    assert [(m.kind, m.item, m.total, m.layout) for m in info.media[0]] == [("image", 0, 64, (1, 8, 8)), ("image", 1, 64, (1, 8, 8))]
    pixels = torch.stack([api.processors.image_transform(x) for x in (a, b)])
    with torch.no_grad():
        ref = tiny_model.pipeline(tiny_model.encode_images(pixels))
    for r, m in enumerate(info.media[0]):
        assert m.kept == ref.index[r][ref.mask[r]].tolist() and len(m.kept) == 16 and m.kept == sorted(m.kept)
        assert [name for name, _ in m.stages] == ["sam", "fgcs"] and m.stages[0][1] == list(range(64))
        assert m.stages[1][1] == m.kept
    assert info.stats["fgcs"] == {"tokens_in": 64.0, "tokens_out": 16.0, "kept_fraction": 0.25}
    # the LLM sees 48 fewer tokens per image; the prompt keeps its unreduced positions
    _, full = api.generate(["two images", "none"], images=[[a, b], []], max_new_tokens=3, return_stats=True, retention=1)
    assert full.prompt_lengths == info.prompt_lengths
    assert [f - i for f, i in zip(full.llm_tokens, info.llm_tokens)] == [96, 0]


def test_model_generate_return_info_with_media_tokens(api, tiny_model):
    batch = api.build_batch(["q"], images=[[picture(10)]])
    out, media_tokens, info = tiny_model.generate(**batch, max_new_tokens=2, return_media_tokens=True, return_info=True)
    assert media_tokens.tolist() == [16] and len(info.media[0][0].kept) == 16
    assert torch.equal(out, tiny_model.generate(**batch, max_new_tokens=2))


# ------------------------------------------------------------------------------------------ overlay
def highlighted(panel: Image.Image, grid=(8, 8), frames: int = 1, top: int = 0) -> int:
    """Kept cells of one panel (or row of frames) of an overlay: their outline's left-edge midpoint."""
    px = panel.load()
    width = (panel.width - GAP * (frames - 1)) // frames
    xs, ys = cell_edges(width, grid[1]), cell_edges(width, grid[0])
    return sum(px[t * (width + GAP) + xs[c], top + TITLE_HEIGHT + (ys[r] + ys[r + 1]) // 2] == HIGHLIGHT
               for t in range(frames) for r in range(grid[0]) for c in range(grid[1]))


def test_overlay_highlights_the_kept_cells(api, tmp_path):
    white = Image.new("RGB", (64, 64), "white")
    one = api.kept_tokens_overlay(white, "what?", retention=0.25)
    assert one.size == (256, TITLE_HEIGHT + 256)
    assert highlighted(one) == 16
    # pruned cells are dimmed, kept ones keep the encoder's pixels
    px = one.load()
    assert sorted({px[16 + 32 * c, TITLE_HEIGHT + 16 + 32 * r][0] for r in range(8) for c in range(8)}) == [63, 255]
    every = api.kept_tokens_overlay(white, "what?", retention=1)
    assert every.size == one.size and highlighted(every) == 64
    one.save(tmp_path / "o.png")
    assert Image.open(tmp_path / "o.png").size == one.size


def test_overlay_has_a_panel_per_reducing_stage(api):
    _, info = api.generate("q", images=[picture(11)], pipeline=HYBRID, max_new_tokens=1, return_stats=True)
    recovered = len(info.media[0][0].kept)
    assert recovered == 16 + math.ceil(0.25 * 48)
    two = api.kept_tokens_overlay(picture(11), "q", pipeline=HYBRID)
    assert two.size == (2 * 256 + GAP, TITLE_HEIGHT + 256)
    assert highlighted(two.crop((0, 0, 256, two.height))) == 16
    assert highlighted(two.crop((256 + GAP, 0, two.width, two.height))) == recovered


def test_video_overlay_is_a_row_of_frames(api):
    clip = torch.from_numpy(np.random.default_rng(12).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    _, info = api.generate("q", videos=[clip], max_new_tokens=1, return_stats=True)
    m = info.media[0][0]
    assert (m.kind, m.layout, m.total, len(m.kept)) == ("video", (4, 8, 8), 256, 64)
    row = api.kept_tokens_overlay(video=clip, prompt="q", scale=2)
    assert row.size == (4 * 128 + 3 * GAP, TITLE_HEIGHT + 128)
    assert highlighted(row, frames=4) == 64
    with pytest.raises(InvalidArgumentError, match="give image= or video="):
        api.kept_tokens_overlay()


# ------------------------------------------------------------------------------------------ max_new_tokens
@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_max_new_tokens_below_one_is_refused(api, n):
    with pytest.raises(InvalidArgumentError, match=f"max_new_tokens={n!r}: give an integer >= 1"):
        api.generate("q", max_new_tokens=n)


def test_max_new_tokens_is_capped_by_the_context(api):
    _, info = api.generate("q", images=[picture()], max_new_tokens=1, return_stats=True)
    span = info.prompt_lengths[0]
    limit = api.model.llm.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=(
            rf"prompt #0 of the batch spans {span} positions and max_new_tokens={limit - span + 1}: {limit + 1} > "
            rf"the LLM's context of {limit} positions .* give max_new_tokens <= {limit - span}")):
        api.generate("q", images=[picture()], max_new_tokens=limit - span + 1)


def test_generate_from_embeds_fits_the_context_exactly():
    lm = DecoderLM(build_llm({**TINY_LLM, "num_hidden_layers": 1, "max_position_embeddings": 16}, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 10))
    mask, pos = torch.ones_like(ids), torch.arange(10).expand(2, 10)
    kw = dict(eos_token_id=[], pad_token_id=0)
    assert generate_from_embeds(lm, lm.embed(ids), mask, pos, 6, **kw).shape == (2, 6)
    with pytest.raises(ContextLengthError, match="spans 10 positions and max_new_tokens=7: 17 > the LLM's context of 16"):
        generate_from_embeds(lm, lm.embed(ids), mask, pos, 7, **kw)


def test_new_stages_start_the_same_everywhere_and_leave_the_global_rng(tiny_model):
    image = picture(13)
    state = torch.random.get_rng_state()
    first = LlavaDeft(tiny_model, device="cpu").generate("q", images=[image], pipeline="configs/pipeline/deft.yaml",
                                                         max_new_tokens=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)
    again = LlavaDeft(tiny_model, device="cpu").generate("q", images=[image], pipeline="configs/pipeline/deft.yaml",
                                                         max_new_tokens=5)
    assert first == again
