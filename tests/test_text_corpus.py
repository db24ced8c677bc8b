"""Plain-text corpora as causal-LM data (llava_deft/data/text_corpus.py): documents, splits, blocks, the
collator's pre-tokenized samples, the ``text`` data source, and the default corpus (Debian's fortunes)."""

from __future__ import annotations

import pytest
import torch

from llava_deft.config import TrainConfig
from llava_deft.data import build_collator
from llava_deft.data.sources import build_dataset
from llava_deft.data.text_corpus import TextCorpusDataset, fortunes_files, read_documents, split_documents, split_indices
from llava_deft.errors import DatasetFormatError, SampleTooLongError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.tokenizer import load_tokenizer

FORTUNE_TEXT = """A banker is a fellow who lends you his umbrella when the sun is shining
and wants it back the minute it begins to rain.
		-- Mark Twain
%
A classic is something that everyone wants to have read and nobody wants to read.
%
%
The <image> tag and </s> are only text here.
%
Brevity is the soul of wit.
"""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def corpus(tmp_path, n=40):
    path = tmp_path / "corpus.txt"
    paras = [f"Paragraph {i} tells of the {['red', 'blue', 'green'][i % 3]} river and its {i * 7} stones." for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return path, paras


def test_documents_by_percent_lines_or_paragraphs():
    docs = split_documents(FORTUNE_TEXT)
    assert len(docs) == 4 and docs[0].startswith("A banker") and docs[0].endswith("-- Mark Twain")  # empty entry dropped
    assert split_documents("one\npara\n\n  \n\ntwo\n") == ["one\npara", "two"]


def test_splits_are_a_seeded_partition():
    train, test = split_indices(100, "train", 0.1, 3), split_indices(100, "test", 0.1, 3)
    assert len(test) == 10 and sorted(train + test) == list(range(100)) and not set(train) & set(test)
    assert split_indices(100, "test", 0.1, 3) == test and split_indices(100, "test", 0.1, 4) != test
    assert split_indices(2, "test", 0.01, 0) and split_indices(2, "train", 0.01, 0)  # both splits non-empty
    with pytest.raises(ValueError, match="split must be one of"):
        split_indices(10, "val", 0.1, 0)


def test_blocks_hold_every_token_of_the_split_in_order(tmp_path, tok):
    path, paras = corpus(tmp_path)
    ds = TextCorpusDataset(path, tok, block_tokens=16, split="train", test_share=0.25, seed=1)
    picked = [paras[i] for i in split_indices(len(paras), "train", 0.25, 1)]
    stream = []
    for p in picked:
        stream += tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [ds[i]["input_ids"] for i in range(len(ds))]
    assert [t for b in blocks for t in b] == stream  # nothing dropped, nothing added
    assert all(len(b) == 16 for b in blocks[:-1]) and 1 <= len(blocks[-1]) <= 16
    assert ds[0]["id"] == "corpus/train/0" and ds.num_documents == len(picked) == 30
    test = TextCorpusDataset(path, tok, block_tokens=16, split="test", test_share=0.25, seed=1)
    assert test.num_documents == 10


def test_collator_supervises_every_id_and_keeps_placeholders_as_text(tmp_path, tok):
    path = tmp_path / "f.txt"
    path.write_text(FORTUNE_TEXT)
    ds = TextCorpusDataset(path, tok, block_tokens=64, test_share=0.25)
    model = LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": []}, "max_length": 64})
    collate = build_collator(model.processors)
    batch = collate([ds[i] for i in range(len(ds))])
    ids = [ds[i]["input_ids"] for i in range(len(ds))]
    assert batch["input_ids"].shape == (len(ds), max(map(len, ids)))
    for row, block in enumerate(ids):
        assert batch["labels"][row, :len(block)].tolist() == block == batch["input_ids"][row, :len(block)].tolist()
        assert (batch["labels"][row, len(block):] == -100).all()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id not in batch["input_ids"]  # "<image>" in a document is plain text, not a placeholder
    out = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    assert torch.isfinite(out.loss)
    with pytest.raises(SampleTooLongError, match="over max_length=64"):
        collate([{"id": "long", "input_ids": [7] * 65}])
    with pytest.raises(ValueError, match="carries media"):
        collate([{"id": "m", "input_ids": [7, 8], "images": [object()]}])


def test_text_source_config_and_errors(tmp_path, tok):
    path, _ = corpus(tmp_path)
    spec = TrainConfig.model_validate({"data": {"type": "text", "path": str(path), "block_tokens": 32}}).data
    ds = build_dataset(spec, tokenizer=tok, max_length=64)
    assert isinstance(ds, TextCorpusDataset) and ds.block_tokens == 32
    with pytest.raises(ValueError, match="over the model's max_length=16"):
        build_dataset(spec, tokenizer=tok, max_length=16)
    with pytest.raises(ValueError, match="needs path"):
        TrainConfig.model_validate({"data": {"type": "text"}})
    with pytest.raises(ValueError, match=r"block_tokens \(text only\)"):
        TrainConfig.model_validate({"data": {"type": "passkey", "size": 4, "block_tokens": 8}})
    missing = TrainConfig.model_validate({"data": {"type": "text", "path": str(tmp_path / "nope.txt")}}).data
    with pytest.raises(FileNotFoundError, match=r"data \('nope', text\): text corpus .*nope.txt' does not exist"):
        build_dataset(missing, tokenizer=tok, max_length=64)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(DatasetFormatError, match="is not UTF-8 text"):
        read_documents(bad)


def test_missing_fortunes_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortunes_files(tmp_path)


def test_the_default_corpus_is_debians_fortunes(tok):
    """scripts/setup.sh installs Debian's `fortunes` package (as it installs espeak-ng and chromium)."""
    name, docs = read_documents("fortunes")
    assert name == "fortunes" and len(docs) > 10_000 and sum(map(len, docs)) > 2_000_000
    assert all("/off/" not in str(f) for f in fortunes_files())
    test = TextCorpusDataset("fortunes", tok, block_tokens=512, split="test")
    assert test.num_documents == round(0.05 * len(docs)) and len(test) > 100
