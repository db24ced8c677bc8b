"""The committed tiny tokenizer: round-trips, single-token placeholders, the chat template's BPE boundary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llava_deft.model.tokenizer import MEDIA_TOKENS, TINY_TOKENIZER_DIR, load_tokenizer, media_token_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens_and_vocab(tok):
    assert tok.pad_token == "<pad>" and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.unk_token == "<unk>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert 1000 <= len(tok) <= 2000
    assert media_token_ids(tok) == {m: tok.convert_tokens_to_ids(t) for m, t in MEDIA_TOKENS.items()}


@pytest.mark.parametrize("modality", ["image", "video", "audio", "text"])
def test_placeholders_are_single_tokens_in_context(tok, modality):
    text = MEDIA_TOKENS[modality]
    pid = media_token_ids(tok)[modality]
    for context in (f"{text}", f"a{text}b", f" {text}\nwhat?", f"{text}{text}"):
        ids = tok.encode(context, add_special_tokens=False)
        assert ids.count(pid) == context.count(text)
        assert tok.decode(ids) == context


@pytest.mark.parametrize(
    "text",
    [
        "what is the blue shape?",
        "Arbitrary text: x = f(1) + 2; print('done')\n\ttabs  and  spaces ",
        "héllo wörld, naïve café — 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский",
        "",
        "\n\n",
        "   leading spaces and trailing   ",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens(tok):
    # bos comes from the chat template only, so it is never doubled
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)


def test_chat_format_exact(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nwhat is the blue shape?"},
        {"role": "assistant", "content": "rectangle"},
        {"role": "user", "content": "sure?"},
        {"role": "assistant", "content": "yes"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<s>Be brief.\nUSER: <image>\nwhat is the blue shape?\nASSISTANT: rectangle</s>\n"
        "USER: sure?\nASSISTANT: yes</s>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>Be brief.\nUSER: <image>\nwhat is the blue shape?\nASSISTANT:"


@pytest.mark.parametrize(
    "history, answer",
    [
        ([], "rectangle"),
        ([], "a red circle, next to 2 blue squares."),
        ([], ":) yes!"),
        ([], "  two leading spaces"),
        ([], "日本語 🙂"),
        ([], ""),
        ([("<image>\nwhat color is the shape?", "teal")], "no"),
    ],
)
def test_generation_prompt_is_token_prefix_of_training(tok, history, answer):
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": "<image>\ndoes the image contain a circle?"})
    prompt = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    prompt_ids = list(prompt["input_ids"])
    full = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(full["input_ids"]), list(full["assistant_masks"])
    n = len(prompt_ids)
    # what the model generates after the prompt is exactly the trained answer: same ids, same boundary
    assert ids[:n] == prompt_ids
    last_turn = [i for i in range(n, len(ids)) if mask[i]]
    assert last_turn[0] == n and last_turn == list(range(n, len(ids) - 1))
    generated = ids[n : len(ids) - 1]
    assert generated[-1] == tok.eos_token_id
    assert tok.decode(generated) == f" {answer}</s>"
    assert tok.decode(ids[-1:]) == "\n" and mask[-1] == 0


def test_template_rejects_unknown_role(tok):
    with pytest.raises(jinja2.TemplateError, match="unknown role 'bot'"):
        tok.apply_chat_template([{"role": "bot", "content": "hi"}], tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="system message may only come first"):
        tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], tokenize=False
        )


def test_load_missing_dir(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)


def test_load_local_dir_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "yes"}]
    assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_load_rejects_incomplete_tokenizer(tmp_path):
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing a pad token.*<image> token.*chat template"):
        load_tokenizer(tmp_path)


def test_load_rejects_missing_chat_template(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=r"missing a chat template"):
        load_tokenizer(tmp_path)


def test_build_script_reproduces_committed_tokenizer(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
