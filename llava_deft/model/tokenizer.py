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

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import ConfigError
from ..modality import PLACEHOLDERS

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"

MEDIA_TOKENS: dict[str, str] = PLACEHOLDERS
"""Placeholder text per modality (the registry's, ``llava_deft.modality``); each must be one token of
the tokenizer to be used (only ``<image>`` is required: a tokenizer without the others, e.g. one saved
before ``<text>`` existed, just cannot take that modality)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of which a directory holding a saved tokenizer has at least one."""


def load_tokenizer(path: str | Path | None = None, pad_from_unk: bool = False) -> PreTrainedTokenizerBase:
    """Load the committed tiny tokenizer (``path=None``) or a tokenizer saved in a local directory.

    Never downloads. A chat template missing from the tokenizer's own files is taken from the
    processor's (``chat_template.json`` / ``processor_config.json``, as transformers' processors save
    it); a template written for typed content parts (``[{"type": "text", "text": ...}]``, llava-hf's)
    that would drop a plain string content gets a prefix turning each string into one text part, so
    our collator's ``{"content": "<image>\\nwhat?"}`` renders as it does in LLaVA. With
    ``pad_from_unk``, a tokenizer without a pad token pads with its unk token (never attended to).

    Raises ``FileNotFoundError`` naming ``path`` when it is not a directory, and ``ValueError`` when
    the tokenizer lacks a pad token, the ``<image>`` token or a chat template that renders text.
    """
    directory = TINY_TOKENIZER_DIR if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory '{directory}' does not exist; pass a local directory written by "
            f"save_pretrained, or None for the bundled tiny tokenizer"
        )
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if not tok.chat_template:
        tok.chat_template = _processor_chat_template(directory)
    if isinstance(tok.chat_template, str) and _drops_string_content(tok, tok.chat_template):
        tok.chat_template = STRING_CONTENT_PREFIX + tok.chat_template
    if pad_from_unk and tok.pad_token_id is None and tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    check_tokenizer(tok, name=str(directory))
    return tok


def load_model_tokenizer(tokenizer: str | None, llm_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model config: ``tokenizer:``; without it, the LLM directory's own
    (``llm.path``), so a real LLM never meets the tiny tokenizer's vocabulary; the tiny tokenizer
    only for an LLM built from a config. ``ConfigError`` when ``llm.path`` holds no tokenizer."""
    if tokenizer is None and llm_path is not None:
        if not Path(llm_path).is_dir():
            raise FileNotFoundError(f"LLM directory '{llm_path}' (llm.path) does not exist (expected a save_pretrained folder)")
        if not any((Path(llm_path) / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"llm.path '{llm_path}' holds no tokenizer ({' / '.join(TOKENIZER_FILES)}) and the config sets no "
                f"tokenizer: set tokenizer: to the LLM's tokenizer directory (its vocabulary must fit the LLM's "
                f"embeddings; the bundled tiny tokenizer is only for LLMs built from llm.config)"
            )
        tokenizer = llm_path
    return load_tokenizer(tokenizer)


_PROBE = "llava-deft probe 7f3c"
STRING_CONTENT_PREFIX = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': [{'type': 'text', 'text': m['content']}]}] -%}"
    "{%- else -%}{%- set ns.messages = ns.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)
"""Jinja prepended to a chat template that expects typed content parts: each string content becomes
``[{"type": "text", "text": content}]``."""


def _drops_string_content(tok: PreTrainedTokenizerBase, template: str) -> bool:
    """Whether ``template`` renders a user message given as a plain string WITHOUT its text (a
    template that raises on it is left for the collator to report)."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": _PROBE}], chat_template=template,
                                       tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return _PROBE not in text


def _processor_chat_template(directory: Path) -> str | None:
    """The chat template a processor saved beside the tokenizer (``chat_template.json`` of
    transformers 4.x, or ``processor_config.json``), if any."""
    for name in ("chat_template.json", "processor_config.json"):
        file = directory / name
        if file.is_file():
            try:
                template = json.loads(file.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"'{file}' is not a JSON object; re-download it or delete it") from None
            if template:
                return template
    return None


def check_tokenizer(tok: PreTrainedTokenizerBase, name: str = "tokenizer") -> None:
    """Raise ``ValueError`` listing what ``tok`` lacks for multimodal chat training."""
    missing = []
    if tok.pad_token_id is None:
        missing.append("a pad token (set tokenizer.pad_token)")
    if _single_token_id(tok, MEDIA_TOKENS["image"]) is None:
        missing.append(f"the {MEDIA_TOKENS['image']} token as one token (add it as a special token)")
    if not tok.chat_template:
        missing.append("a chat template (tokenizer.chat_template)")
    elif isinstance(tok.chat_template, str) and _drops_string_content(tok, tok.chat_template):
        missing.append("a chat template that renders a message's text given as a string")
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
