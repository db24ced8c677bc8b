"""The generated scenes task (llava_deft/tasks/scenes.py): deterministic files, disjoint splits, every
answer recomputed from the scene by an independent reading of its question, balanced question types and
answers, object sizes and placement, and clear errors; and the small-object video variant (video_small)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from llava_deft.tasks import DEFAULT_TASKS, TASK_NAMES, prepare_command
from llava_deft.tasks.prepare import PRESETS, prepare_tasks
from llava_deft.tasks.scenes import (
    COLORS,
    QUESTION_TYPES,
    RELATION_MARGIN,
    SHAPES,
    SIZES,
    CAPTION_PROMPT,
    SceneObject,
    SceneSpec,
    main,
    make_scene,
    make_scenes_task,
    render_scene,
    sample_scene,
    scene_caption,
    where,
)

N = 200  # scenes checked by the statistical tests (about 0.2 s to draw)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(0, "train", i) for i in range(N)]


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ files


def test_same_arguments_same_files(tmp_path):
    make_scenes_task(tmp_path / "a", n_train=6, n_test=3, progress=False)
    make_scenes_task(tmp_path / "b", n_train=6, n_test=3, progress=False)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert set(fa) == set(fb) and fa == fb
    assert sorted(k for k in fa if k.endswith(".png")) == [f"{s}/images/{i:06d}.png" for s, n in (("test", 3), ("train", 6))
                                                           for i in range(n)]
    meta = json.loads(fa["meta.json"])
    assert {k: meta[k] for k in ("n_train", "n_test", "size", "min_objects", "max_objects", "noise", "seed")} == {
        "n_train": 6, "n_test": 3, "size": 96, "min_objects": 3, "max_objects": 6, "noise": 4, "seed": 0}
    records = json.loads(fa["train.json"])
    assert len({r["id"] for r in records}) == len(records)
    r = records[0]
    assert r["id"] == "scenes-train-000000-relation_color" and r["image"] == "train/images/000000.png"
    assert r["conversations"][0]["value"].startswith("<image>\nwhat color is the ")
    # an image's file holds exactly the rendered pixels (PNG is lossless)
    spec, questions = make_scene(0, "train", 0)
    png = np.asarray(Image.open(tmp_path / "a" / r["image"]))
    assert png.shape == (96, 96, 3) and png.dtype == np.uint8 and np.array_equal(png, render_scene(spec))
    assert [x["question_type"] for x in records if x["image"] == r["image"]] == [q for q, _, _ in questions]
    # another seed, other images
    make_scenes_task(tmp_path / "c", n_train=2, n_test=0, seed=1, progress=False)
    assert files(tmp_path / "c")["train/images/000000.png"] != fa["train/images/000000.png"]


def test_captions_name_every_object_in_reading_order(tmp_path):
    make_scenes_task(tmp_path, n_train=4, n_test=2, progress=False)
    for split, n in (("train", 4), ("test", 2)):
        caps = json.loads((tmp_path / f"{split}_captions.json").read_text())
        assert [c["image"] for c in caps] == [f"{split}/images/{i:06d}.png" for i in range(n)]
        for i, c in enumerate(caps):
            assert c["id"] == f"scenes-{split}-{i:06d}-caption" and c["question_type"] == "caption"
            assert c["conversations"][0]["value"] == f"<image>\n{CAPTION_PROMPT}"
            spec, _ = make_scene(0, split, i)
            parts = c["conversations"][1]["value"].removesuffix(".").split(", ")
            # one part per object, each "<size> <colour> <shape> at <cell>", every object once
            parsed = [re.fullmatch(r"(small|large) (\w+) (circle|square|triangle) at ([a-z ]+)", p).groups() for p in parts]
            assert Counter(p[:3] for p in parsed) == Counter((o.size, o.color, o.shape) for o in spec.objects)
            # reading order: rows top -> bottom, then left to right inside a row
            rows = [0 if p[3].startswith("top") else 2 if p[3].startswith("bottom") else 1 for p in parsed]
            assert rows == sorted(rows)
    assert json.loads((tmp_path / "meta.json").read_text())["captions"] is True
    make_scenes_task(tmp_path / "none", n_train=2, n_test=1, progress=False, captions=False)
    assert not list((tmp_path / "none").glob("*_captions.json"))
    assert json.loads((tmp_path / "none" / "train.json").read_text()) == json.loads(
        (tmp_path / "train.json").read_text())[:len(json.loads((tmp_path / "none" / "train.json").read_text()))]


def test_caption_cells_and_order():
    obj = lambda shape, color, size, x, y: SceneObject(shape, color, size, 9.0, (x, y))
    assert [where(obj("circle", "red", "small", x, y), 96) for x, y in
            ((5, 5), (50, 5), (90, 5), (5, 50), (50, 50), (90, 50), (5, 90), (50, 90), (95.9, 95.9))] == [
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    spec = SceneSpec(96, 220, 0, 0, (obj("square", "blue", "large", 80, 80), obj("circle", "red", "small", 70, 10),
                                     obj("triangle", "green", "small", 10, 20)))
    assert scene_caption(spec) == ("small green triangle at top left, small red circle at top right, "
                                   "large blue square at bottom right.")


def test_train_and_test_images_are_disjoint():
    digest = lambda split, i: hashlib.sha256(render_scene(make_scene(0, split, i)[0]).tobytes()).hexdigest()
    train = {digest("train", i) for i in range(150)}
    test = {digest("test", i) for i in range(50)}
    assert len(train) == 150 and len(test) == 50 and not train & test


def test_image_size_follows_the_argument():
    for size in (64, 96, 192):
        spec, _ = make_scene(3, "test", 5, size=size)
        assert render_scene(spec).shape == (size, size, 3)
        for o in spec.objects:  # object extents scale with the canvas
            lo, hi = SIZES[o.size]
            assert lo * size <= o.extent <= hi * size


def test_llava_json_dataset_reads_the_task(tmp_path):
    from llava_deft.config import load_model_config
    from llava_deft.data import LlavaJsonDataset
    from llava_deft.model import LlavaDeftForCausalLM

    make_scenes_task(tmp_path, n_train=3, n_test=2, progress=False)
    ds = LlavaJsonDataset(tmp_path / "test.json")
    assert len(ds) == len(json.loads((tmp_path / "test.json").read_text())) >= 2 * 2  # count, presence always
    item = ds[0]
    assert len(item["images"]) == 1 and item["images"][0].size == (96, 96)
    # the task's model config: 144 visual tokens per 96x96 scene (8 px per token)
    model = LlavaDeftForCausalLM(load_model_config("configs/model/scenes_cs96.yaml"))
    assert model.media_tokens_per_image == 144


# ------------------------------------------------------------------------------------------ answers


def _offset(a, b, rel):
    """Signed distance of a's box centre from b's in rel's direction (computed from the boxes)."""
    ax, ay = (a.box()[0] + a.box()[2]) / 2, (a.box()[1] + a.box()[3]) / 2
    bx, by = (b.box()[0] + b.box()[2]) / 2, (b.box()[1] + b.box()[3]) / 2
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]


def _recompute(spec, question):
    """The answer to ``question`` about ``spec``, read afresh from its words (asserting it is unambiguous)."""
    objs = spec.objects
    if m := re.fullmatch(r"what color is the (small|large) (\w+) (left of|right of|above|below) the (?:(\w+) )?(\w+)\?", question):
        size, shape, rel, anchor_color, anchor_shape = m.groups()
        anchors = [o for o in objs if o.shape == anchor_shape and (anchor_color is None or o.color == anchor_color)]
        assert len(anchors) == 1, question
        a = anchors[0]
        same = [o for o in objs if o is not a and o.size == size and o.shape == shape]
        assert all(abs(_offset(o, a, rel)) > RELATION_MARGIN * spec.size for o in same), f"borderline: {question}"
        hits = [o for o in same if _offset(o, a, rel) > 0]
        assert len(hits) == 1, question
        return hits[0].color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        hits = [o for o in objs if o.color == m[1]]
        assert len(hits) == 1, question
        return hits[0].shape
    if m := re.fullmatch(r"what color is the (small|large) (\w+)\?", question):
        hits = [o for o in objs if (o.size, o.shape) == m.groups()]
        assert len(hits) == 1, question
        return hits[0].color
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        assert m[1] in COLORS
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        assert m[1] in SHAPES
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        assert m[1] in COLORS and m[2] in SHAPES and question.startswith("is there an " if m[1] == "orange" else "is there a ")
        return "yes" if any((o.color, o.shape) == m.groups() for o in objs) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_follows_from_the_scene(scenes):
    for spec, questions in scenes:
        assert len({q for q, _, _ in questions}) == len(questions)  # at most one question per type
        for qtype, question, answer in questions:
            assert qtype in QUESTION_TYPES and re.fullmatch(r"[a-z0-9]+", answer), (qtype, answer)
            assert _recompute(spec, question) == answer, (question, answer, spec)


def test_question_types_and_answers_are_balanced(scenes):
    by_type = Counter(q for _, qs in scenes for q, _, _ in qs)
    assert set(by_type) == set(QUESTION_TYPES)
    assert by_type["count"] == by_type["presence"] == N  # always askable
    assert all(by_type[t] >= 0.85 * N for t in QUESTION_TYPES), by_type
    answers = {t: Counter(a for _, qs in scenes for q, _, a in qs if q == t) for t in QUESTION_TYPES}
    assert 0.4 <= answers["presence"]["yes"] / N <= 0.6
    for t, names in (("relation_color", COLORS), ("color", COLORS), ("shape", SHAPES)):
        assert set(answers[t]) == set(names)
        assert max(answers[t].values()) <= 2.5 * min(answers[t].values()), (t, answers[t])
    counts = answers["count"]
    assert set(counts) >= {"0", "1", "2", "3"} and max(counts.values()) <= 0.4 * N, counts
    # most relation questions need the relation: the named size and shape alone would be ambiguous
    needed = 0
    for spec, qs in scenes:
        for q, question, _ in qs:
            if q == "relation_color":
                size, shape = question.split()[4:6]
                needed += sum((o.size, o.shape) == (size, shape) for o in spec.objects) > 1
    assert needed >= 0.4 * by_type["relation_color"]


# ------------------------------------------------------------------------------------------ objects


@pytest.mark.parametrize("size, lo, hi", [(96, 3, 6), (192, 3, 6), (64, 2, 8), (96, 8, 8)])
def test_objects_in_range_inside_and_apart(size, lo, hi):
    numbers = Counter()
    for i in range(100):
        spec = sample_scene(np.random.default_rng([size, lo, hi, i]), size=size, min_objects=lo, max_objects=hi)
        numbers[len(spec.objects)] += 1
        assert spec.size == size and 200 <= spec.background < 236 and 0 <= spec.noise <= 4
        for j, o in enumerate(spec.objects):
            assert o.shape in SHAPES and o.color in COLORS
            r_lo, r_hi = SIZES[o.size]
            assert r_lo * size <= o.extent <= r_hi * size
            x0, y0, x1, y1 = o.box()
            assert 0 < x0 and 0 < y0 and x1 < size and y1 < size
            for p in spec.objects[:j]:  # boxes never overlap, with a gap between them
                a, b = o.box(), p.box()
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (o, p)
    assert set(numbers) == set(range(lo, hi + 1))


def test_rendered_colours_are_where_the_objects_are():
    spec, _ = make_scene(0, "test", 1, noise=0)
    img = render_scene(spec).astype(int)
    assert spec.noise == 0
    for o in spec.objects:
        cx, cy = (int(v) for v in o.center)
        if o.shape != "triangle":  # a triangle's box centre may lie on its anti-aliased edge
            assert np.abs(img[cy, cx] - np.array(COLORS[o.color])).max() <= 2
    corner_free = all(o.box()[0] > 2 or o.box()[1] > 2 for o in spec.objects)
    if corner_free:
        assert (img[0, 0] == spec.background).all()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, match", [
    ({"min_objects": 5, "max_objects": 4}, r"min_objects \(5\) must be <= max_objects \(4\)"),
    ({"size": 32}, r"size must be >= 64 pixels .*got 32"),
    ({"min_objects": 1}, r"min_objects must be >= 2 \(a relation needs two objects\), got 1"),
    ({"max_objects": 9}, r"max_objects must be <= 8 .*got 9"),
    ({"noise": -1}, r"noise must be in \[0, 32\] gray levels, got -1"),
    ({"n_train": -1}, r"n_train must be >= 0, got -1"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scenes_task(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n-train", "2", "--n-test", "1", "--size", "128", "--max-objects", "4"])
    assert "wrote 2 train / 1 test images" in capsys.readouterr().out
    assert Image.open(tmp_path / "train" / "images" / "000001.png").size == (128, 128)
    assert json.loads((tmp_path / "meta.json").read_text())["max_objects"] == 4
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--min-objects", "7", "--max-objects", "6"])
    assert "min_objects (7) must be <= max_objects (6)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_writes_scenes_and_video_small_only_when_asked(tmp_path):
    assert {"scenes", "video_small"} <= set(TASK_NAMES) and not {"scenes", "video_small"} & set(DEFAULT_TASKS)
    assert all(set(p) == set(TASK_NAMES) for p in PRESETS.values())
    assert prepare_command("d", "scenes") == "python -m llava_deft.tasks --out d --only scenes"
    assert prepare_command("d", "passkey") == prepare_command("d") == "python -m llava_deft.tasks --out d"
    tiny = {"scenes": {"n_train": 3, "n_test": 2}, "video_small": {"n_train": 2, "n_test": 1, "frames": 4}}
    done = prepare_tasks(tmp_path, "small", ["scenes", "video_small"], progress=False, overrides=tiny)
    assert {t: m["status"] for t, m in done["tasks"].items()} == {"scenes": "generated", "video_small": "generated"}
    assert done["tasks"]["video_small"]["records"] == {"train": 10, "test": 5}
    n_q = lambda split, n: sum(len(make_scene(0, split, i)[1]) for i in range(n))
    assert done["tasks"]["scenes"]["records"] == {"train": n_q("train", 3), "test": n_q("test", 2)}
    assert json.loads((tmp_path / "video_small" / "meta.json").read_text())["object_scale"] == 0.5
    again = prepare_tasks(tmp_path, "small", ["scenes", "video_small"], progress=False, overrides=tiny)
    assert {m["status"] for m in again["tasks"].values()} == {"cached"}


def test_video_small_shapes_are_smaller_than_the_default():
    from llava_deft.tasks.video_shapes import make_video_task, render_clip, sample_clip

    args = PRESETS["full"]["video_small"]
    assert args["object_scale"] == 0.5 and {k: v for k, v in args.items() if k != "object_scale"} == PRESETS["full"]["video_shapes"]
    big, small = [], []
    for i in range(40):
        default = sample_clip(np.random.default_rng([0, 0, i]))
        assert sample_clip(np.random.default_rng([0, 0, i]), object_scale=1.0) == default  # the default is unchanged
        half = sample_clip(np.random.default_rng([0, 0, i]), object_scale=0.5)
        assert half.radius == pytest.approx(default.radius / 2) and half.shape == default.shape
        big.append(default.radius)
        small.append(half.radius)
        frames = render_clip(half)  # the shape stays inside the frame
        assert frames.shape == (16, 64, 64, 3)
        painted = lambda f, s: int((np.abs(f.astype(int) - np.array(s.background)).sum(-1) > 30).sum())
        assert 0 < painted(frames[0], half) < painted(render_clip(default)[0], default)
    assert max(small) < min(big)
    with pytest.raises(ValueError, match=r"object_scale must be in \[0.25, 2\].*got 0.1"):
        make_video_task("unused", object_scale=0.1)
