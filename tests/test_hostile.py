"""The committed hostile-input corpus (``tests/fixtures/hostile``, written by
``scripts/make_hostile_corpus.py``): every case raises its typed error, whose message names the input,
through the entry a user would reach it by; and the corpus regenerates byte for byte."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

import pipeline
from llava_deft import errors
from llava_deft.cli import main as cli_main
from llava_deft.config import load_model_config, load_train_config
from llava_deft.data import LlavaJsonDataset, build_collator
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.modality import MODALITIES

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "fixtures" / "hostile"
CASES = json.loads((HOSTILE / "cases.json").read_text())["cases"]
KINDS = ("image", "video", "audio", "record", "config", "checkpoint", "cli")


def load_script():
    spec = importlib.util.spec_from_file_location("make_hostile_corpus", ROOT / "scripts" / "make_hostile_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_class(name: str) -> type[BaseException]:
    for where in (errors, pipeline, builtins):
        if isinstance(getattr(where, name, None), type):
            return getattr(where, name)
    raise AssertionError(f"unknown error class {name!r} in cases.json")


def test_the_manifest():
    assert len(CASES) == 90
    counts = {k: sum(c["kind"] == k for c in CASES) for k in KINDS}
    assert counts == {"image": 10, "video": 8, "audio": 9, "record": 27, "config": 24, "checkpoint": 3, "cli": 9}
    assert len({c["id"] for c in CASES}) == len(CASES)
    for c in CASES:
        assert set(c) == {"id", "kind", "input", "error", "match"}, c["id"]
        if c["kind"] == "cli":
            assert c["error"] == "exit 2" and c["match"].startswith("^llava-deft ")
            continue
        error_class(c["error"])
        assert Path(c["input"]).stem in c["match"], f"{c['id']}: the match must name the input"
        absent = Path(c["input"]).stem == "missing"  # image/missing.png ...: meant not to exist
        assert (HOSTILE / c["input"]).exists() != absent, c["id"]


@pytest.fixture(scope="module")
def collate(tiny_model):
    return build_collator(tiny_model.processors)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("model") / "m")


def run_case(case: dict, collate, tmp_path: Path) -> None:
    kind, given = case["kind"], case["input"]
    if kind in ("image", "video", "audio"):  # one record naming the file, media folder = the corpus
        media = MODALITIES[kind]
        record = {"id": case["id"], media.record_key: given, "conversations": [
            {"from": "human", "value": f"{media.placeholder}\nwhat is it?"}, {"from": "gpt", "value": "a shape"}]}
        (tmp_path / "case.json").write_text(json.dumps([record]))
        ds = LlavaJsonDataset(tmp_path / "case.json", HOSTILE)
        collate([ds[i] for i in range(len(ds))])
    elif kind == "record":
        ds = LlavaJsonDataset(HOSTILE / given)
        collate([ds[i] for i in range(len(ds))])
    elif kind == "config":
        path = HOSTILE / given
        if path.parent.name == "pipeline":
            pipeline.validate_config(path)
        elif path.parent.name == "model":
            load_model_config(path)
        else:
            load_model_config(load_train_config(path).model)
    elif kind == "checkpoint":
        LlavaDeftForCausalLM.from_pretrained(HOSTILE / given)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] != "cli"], ids=lambda c: c["id"])
def test_case_raises_its_typed_error(case, collate, tmp_path):
    with pytest.raises(error_class(case["error"]), match=case["match"]):
        run_case(case, collate, tmp_path)


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "cli"], ids=lambda c: c["id"])
def test_cli_case_is_one_line_and_exit_2(case, model_dir, capsys):
    argv = [a.replace("{hostile}", str(HOSTILE)).replace("{model}", str(model_dir)) for a in case["input"]]
    try:
        rc = cli_main(argv)
    except SystemExit as stop:  # argparse's usage errors
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(case["match"], lines[0]), lines[0]


def test_path_escapes_read_the_same_whether_the_target_exists():
    existing = next(c for c in CASES if c["id"] == "record_escape_existing")
    missing = next(c for c in CASES if c["id"] == "record_escape_missing")
    assert (HOSTILE / "image" / "truncated.png").is_file() and not (HOSTILE / "image" / "nope.png").exists()
    messages = []
    for c in (existing, missing):
        with pytest.raises(errors.MediaPathError) as info:
            LlavaJsonDataset(HOSTILE / c["input"])
        messages.append(str(info.value).replace(Path(c["input"]).stem, "X").replace("truncated", "nope"))
    assert messages[0] == messages[1]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file of ``root`` (relative path -> bytes) and every symlink (-> 'link:' target)."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            out[rel] = f"link:{os.readlink(path)}" if path.is_symlink() else path.read_bytes()
    return out


def test_the_corpus_regenerates_byte_for_byte(tmp_path):
    cases = load_script().make_corpus(tmp_path / "hostile")
    assert cases == CASES
    fresh, committed = tree(tmp_path / "hostile"), tree(HOSTILE)
    assert sorted(fresh) == sorted(committed)
    changed = [k for k in fresh if fresh[k] != committed[k]]
    assert not changed, f"regenerate with `python scripts/make_hostile_corpus.py`: {changed} differ"
    size = sum(len(v) for v in committed.values() if isinstance(v, bytes))
    assert size < 400_000  # small: well under 1 MB
