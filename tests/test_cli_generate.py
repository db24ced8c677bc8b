"""``llava-deft generate``'s flags, ``--version``, help texts, and one-line errors (exit 2)."""

import argparse
import io
import math
import sys

import numpy as np
import pytest
from PIL import Image

import llava_deft
from llava_deft.cli import build_parser, main
from llava_deft.overlay import TITLE_HEIGHT

from tests.test_inference_api import highlighted


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    """A saved tiny model (sam -> fgcs at 0.25), an image file and the API on the saved model."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model.save_pretrained(root / "m")
    image = root / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    return root / "m", image, llava_deft.load_model(root / "m", device="cpu")


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"llava-deft": parser, **sub.choices}
    missing = [f"{name} {a.dest}" for name, p in parsers.items() for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]
    assert missing == []
    flags = {o for a in parsers["generate"]._actions for o in a.option_strings}
    assert {"--pipeline", "--retention", "--device", "--system", "--do-sample", "--temperature", "--top-k", "--top-p",
            "--seed", "--stream", "--overlay", "--stats", "--debug", "--max-new-tokens", "--image", "--video"} <= flags


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"llava-deft {llava_deft.__version__}\n"


@pytest.mark.parametrize("retention", [0.25, 0.3])
def test_retention_with_stats_prints_each_stage(saved, capsys, retention):
    model, image, api = saved
    rc, out, _ = run(capsys, "--model", model, "--image", image, "--retention", retention, "--stats",
                     "--max-new-tokens", 3, "what?")
    n = math.ceil(retention * 64)
    answer = api.generate("what?", images=[image], retention=retention, max_new_tokens=3)
    assert rc == 0 and out.splitlines() == [
        answer, f"stage fgcs: tokens_in=64 tokens_out={n} kept_fraction={n / 64:g}", f"image 0: kept {n}/64 tokens"]


def test_pipeline_flag_runs_that_pipeline(saved, capsys):
    model, image, api = saved
    rc, out, _ = run(capsys, "--model", model, "--image", image, "--pipeline", "configs/pipeline/deft.yaml", "--stats",
                     "--max-new-tokens", 3, "what?")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == api.generate("what?", images=[image], pipeline="configs/pipeline/deft.yaml", max_new_tokens=3)
    assert lines[1] == "stage fgcs: tokens_in=64 tokens_out=31 kept_fraction=0.484375"  # deft.yaml's 0.482
    assert lines[2].startswith("stage rtd: tokens_in=31 tokens_out=31") and lines[3] == "image 0: kept 31/64 tokens"


def test_system_and_sampling_flags_match_the_api(saved, capsys):
    model, image, api = saved
    rc, out, _ = run(capsys, "--model", model, "--image", image, "--system", "Answer in one word.", "--max-new-tokens", 6,
                     "--do-sample", "--temperature", 0.7, "--top-k", 20, "--top-p", 0.9, "--seed", 3, "--device", "cpu", "q")
    expected = api.generate("q", images=[image], system="Answer in one word.", max_new_tokens=6, do_sample=True,
                            temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert rc == 0 and out == expected + "\n"
    rc, greedy, _ = run(capsys, "--model", model, "--image", image, "--system", "Answer in one word.", "--max-new-tokens", 6, "q")
    assert greedy == api.generate("q", images=[image], system="Answer in one word.", max_new_tokens=6) + "\n"


def test_stream_prints_pieces_as_they_come(saved, capsys, monkeypatch):
    model, image, api = saved

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.parts = []

        def write(self, s):
            self.parts.append(s)
            return super().write(s)

    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "--model", str(model), "--image", str(image), "--stream", "--max-new-tokens", "24", "what?"]) == 0
    expected = api.generate("what?", images=[image], max_new_tokens=24)
    assert out.getvalue() == expected + "\n"
    assert len([p for p in out.parts if p.strip()]) > 1  # several pieces, not the answer at once


def test_overlay_flag_writes_the_first_image(saved, capsys, tmp_path):
    model, image, _ = saved
    rc, _, err = run(capsys, "--model", model, "--image", image, "--retention", 0.25, "--overlay", tmp_path / "o.png",
                     "--max-new-tokens", 2, "what?")
    assert rc == 0 and err == ""
    picture = Image.open(tmp_path / "o.png").convert("RGB")
    assert picture.size == (256, TITLE_HEIGHT + 256) and highlighted(picture) == 16


@pytest.mark.parametrize("flags, named", [
    (["--model", "{tmp}/missing"], "missing' has no config.json"),
    (["--max-new-tokens", "-1"], "max_new_tokens=-1"),
    (["--max-new-tokens", "100000000"], "max_new_tokens=100000000: 100000008 > the LLM's context of 2048"),
    (["--retention", "1.5"], "retention=1.5 is out of range"),
    (["--image", "{tmp}/missing.png"], "missing.png' does not exist"),
    (["--device", "nodevice"], "device='nodevice' is not a torch device"),
    (["--pipeline", "{tmp}/none.yaml"], "none.yaml' does not exist"),
    (["--overlay", "{tmp}/o.png"], "--overlay draws the first image or video: give --image or --video"),
    (["--do-sample", "--temperature", "0"], "temperature must be > 0"),
])
def test_errors_are_one_line_and_exit_2(saved, capsys, tmp_path, flags, named):
    model = saved[0]
    argv = ["--model", str(model), *[f.format(tmp=tmp_path) for f in flags], "q"]
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("llava-deft generate: ") and named in err, err


def test_debug_prints_the_traceback(saved, capsys):
    rc, _, err = run(capsys, "--model", saved[0], "--retention", "1.5", "--debug", "q")
    assert rc == 2 and err.startswith("Traceback") and "InvalidArgumentError" in err
    assert err.splitlines()[-1] == "llava-deft generate: retention=1.5 is out of range: give the fraction of media tokens to keep, in (0, 1]"


def test_usage_errors_and_other_commands_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "m", "--max-new-tokens", "x", "q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == (
        "llava-deft generate: argument --max-new-tokens: invalid int value: 'x' (see llava-deft generate --help)\n")
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llava-deft train: ") and "nope.yaml' does not exist" in err
