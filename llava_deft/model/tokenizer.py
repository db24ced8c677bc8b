"""Tokenizer loading: the committed tiny byte-level BPE tokenizer, or any local HF tokenizer directory.

The tiny tokenizer (``llava_deft/assets/tiny_tokenizer``, built by ``scripts/build_tokenizer.py``, no
download) has ``<pad>`` ``<s>`` ``</s>`` ``<unk>`` and one single-token placeholder per modality
(``<image>``, ``<video>``, ``<audio>`` at ids 4-6; ``<text>``, a passage routed through the reduction
pipeline, appended later at id 1162 so that no earlier id moved), and a chat template::

    <s>[{system}\\n]USER: {user}\\nASSISTANT: {answer}</s>\\nUSER: ...\\nASSISTANT: {answer}</s>\\n

where each `` {answer}</s>`` is a ``{% generation %}`` block (the assistant mask) and the generation
prompt ends with ``ASSISTANT:``, a token-exact prefix of the training sequence.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..modality import PLACEHOLDERS

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"

MEDIA_TOKENS: dict[str, str] = PLACEHOLDERS
"""Placeholder text per modality (the registry's, ``llava_deft.modality``); each must be one token of
the tokenizer to be used (only ``<image>`` is required: a tokenizer without the others, e.g. one saved
before ``<text>`` existed, just cannot take that modality)."""


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the committed tiny tokenizer (``path=None``) or a tokenizer saved in a local directory.

    Never downloads. Raises ``FileNotFoundError`` naming ``path`` when it is not a directory, and
    ``ValueError`` when the tokenizer lacks a pad token, the ``<image>`` token or a chat template.
    """
    directory = TINY_TOKENIZER_DIR if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory '{directory}' does not exist; pass a local directory written by "
            f"save_pretrained, or None for the bundled tiny tokenizer"
        )
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    check_tokenizer(tok, name=str(directory))
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase, name: str = "tokenizer") -> None:
    """Raise ``ValueError`` listing what ``tok`` lacks for multimodal chat training."""
    missing = []
    if tok.pad_token_id is None:
        missing.append("a pad token (set tokenizer.pad_token)")
    if _single_token_id(tok, MEDIA_TOKENS["image"]) is None:
        missing.append(f"the {MEDIA_TOKENS['image']} token as one token (add it as a special token)")
    if not tok.chat_template:
        missing.append("a chat template (tokenizer.chat_template)")
    if missing:
        raise ValueError(f"tokenizer {name!r} is missing " + "; ".join(missing))


def media_token_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Placeholder token id per modality the tokenizer has, e.g. ``{"image": 4, "video": 5, "audio": 6,
    "text": 1162}``.

    A modality whose placeholder text does not encode to one known token is left out.
    """
    ids = {m: _single_token_id(tok, text) for m, text in MEDIA_TOKENS.items()}
    return {m: i for m, i in ids.items() if i is not None}


def _single_token_id(tok: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id ``text`` encodes to when it is exactly one non-unk token, else None."""
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tok.unk_token_id:
        return None
    return int(ids[0])
