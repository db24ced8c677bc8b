"""The llava-deft CLI: stages, validate (every shipped YAML, and errors), export, generate."""

import json
from pathlib import Path

from llava_deft.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_stages_lists_the_registry(capsys):
    assert main(["stages"]) == 0
    from pipeline import list_stages

    assert capsys.readouterr().out.split() == list_stages()


def test_validate_every_shipped_yaml(capsys):
    paths = sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml"))
    assert len(paths) == 49, f"configs/ holds {len(paths)} YAML files, not 49: update this count with the change"
    assert main(["validate", *paths]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == len(paths)
    assert "(train)" in out and "(model)" in out and "(pipeline)" in out and "(sweep)" in out


def test_validate_reports_every_bad_file(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("stages:\n  - {name: fgcs, retention_ratoi: 0.5}\n  - {name: tova}\n")
    (tmp_path / "m.yaml").write_text("projector: {type: mlp9x}\n")
    assert main(["validate", str(tmp_path / "p.yaml"), str(tmp_path / "m.yaml"), str(tmp_path / "nope.yaml")]) == 1
    out = capsys.readouterr().out
    assert "stages.0.fgcs.retention_ratoi: Extra inputs are not permitted" in out
    assert "stages.1: stage 'tova' acts inside the LLM: list it under 'llm:'" in out
    assert "projector.type: Input should be 'linear' or 'mlp2x_gelu'" in out
    assert "config file '" in out and "nope.yaml' does not exist" in out


def test_export_and_generate(tmp_path, tiny_model, capsys):
    assert main(["export-easyvqa", str(tmp_path / "d"), "--split", "test", "--limit", "3"]) == 0
    records = json.loads((tmp_path / "d" / "test.json").read_text())
    assert len(records) == 3
    tiny_model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    image = tmp_path / "d" / "images" / records[0]["image"]
    assert main(["generate", "--model", str(tmp_path / "m"), "--image", str(image), "--max-new-tokens", "2", "what?"]) == 0
    import llava_deft

    expected = llava_deft.load_model(tmp_path / "m", device="cpu").generate("what?", images=[image], max_new_tokens=2)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_missing_image_is_a_clear_error(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "q"]) == 2
    assert "x.png' does not exist" in capsys.readouterr().err


def test_generate_with_a_text_passage_and_a_missing_audio_file(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    passage = "The pass key is 48213. Remember it."
    assert main(["generate", "--model", str(tmp_path / "m"), "--text", passage, "--max-new-tokens", "2", "key?"]) == 0
    import llava_deft

    expected = llava_deft.load_model(tmp_path / "m", device="cpu").generate("key?", texts=[passage], max_new_tokens=2)
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", str(tmp_path / "m"), "--audio", str(tmp_path / "x.wav"), "q"]) == 2
    assert "audio file '" in (err := capsys.readouterr().err) and "x.wav': does not exist" in err


def test_generate_compile_flag_reaches_the_model(tmp_path, tiny_model, capsys, monkeypatch):
    """``--compile`` loads the model with ``compile=True``; the answer equals the uncompiled one (aot_eager here:
    inductor's CPU kernels take a minute to build; tests/test_static_decode.py runs inductor itself)."""
    import llava_deft.inference as inference

    tiny_model.save_pretrained(tmp_path / "m")
    seen = []

    def load(path, device=None, pipeline=None, compile=False):
        seen.append(compile)
        return real(path, device=device, pipeline=pipeline, compile="aot_eager" if compile else False)

    real = inference.load_model
    monkeypatch.setattr(inference, "load_model", load)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--compile", "--max-new-tokens", "3", "hello"]) == 0
    expected = real(tmp_path / "m", device="cpu").generate("hello", max_new_tokens=3)
    assert seen == [True] and capsys.readouterr().out == expected + "\n"
