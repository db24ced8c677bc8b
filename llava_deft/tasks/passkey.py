"""The generated long-text task: pass-key retrieval from a long passage of filler sentences.

After Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (2023, https://arxiv.org/abs/2305.16300): one sentence ``The pass key is 48213.
Remember it.`` hides at a random depth in a passage of irrelevant text, and the question asks for the
key. Their filler repeats five fixed sentences; ours draws sentences from small fixed word lists and
templates (no corpus, no network), so passages differ from sample to sample and seed to seed. The
filler has no digits and never says "pass key", so the needle is the only place the answer appears.

Convention for the text modality: the passage is a top-level
``"text"`` field and the prompt holds the placeholder ``<text>`` (:data:`TEXT_TOKEN`) where it goes,
as ``<image>``/``<video>``/``<audio>`` stand for their media::

    {"id": "passkey-train-00000", "text": "The quiet farmer paints the bridge ... The pass key is 48213.
     Remember it. ...", "question_type": "passkey", "passkey": "48213", "depth": 0.4127,
     "text_tokens": 517,
     "conversations": [{"from": "human", "value": "<text>\\nWhat is the pass key?"},
                       {"from": "gpt", "value": "48213"}]}

``depth`` is the share of the filler's tokens before the needle (0: the passage starts with it, 1: ends
with it); ``text_tokens`` is the passage's exact length in tokens of the committed tiny tokenizer
(``load_tokenizer(None)``, no special tokens), drawn uniformly in ``[min_tokens, max_tokens]``.

``<text>`` is ``PLACEHOLDERS["text"]``, one special token of the committed tiny tokenizer (id 1162,
appended after the BPE vocabulary so no other id moved). ``LlavaJsonDataset`` reads the ``"text"``
field, ``MultimodalCollator`` tokenises the passage, and the model embeds it with the LLM's input
embeddings and routes it through the reduction pipeline as a TEXT row spliced at ``<text>``.

Train and test keys never overlap: a key in ``10000..99999`` belongs to the test split when its 1-byte
BLAKE2b digest is odd (:func:`key_split`), about half of the keys each. A hash rather than digit
ranges, so both splits use every leading digit (the tiny tokenizer has one token per leading `` d``,
``Ġ1``..``Ġ9``; a range split would ask the test split for tokens train never produced).

Output (LLaVA conversation JSON; no media files)::

    <out>/meta.json                  the generator's arguments, library versions, tokenizer hash
    <out>/train.json, <out>/test.json

Everything is a function of ``seed``: sample ``i`` of a split draws from its own generator seeded by
``(seed, split, i)``, so it does not depend on how many samples are made; the same arguments give the
same JSON bytes. Training need not read the JSON: :class:`llava_deft.data.passkey.PasskeyDataset` generates any number of
passages on the fly (``data: {type: passkey, size: 100000}`` in a training config).

    .venv/bin/python scripts/make_passkey_task.py --out data/passkey   # 2,000 train / 500 test passages
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..config.train import PASSKEY_MIN_TOKENS, check_passkey_lengths
from ..model.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from ..modality import PLACEHOLDERS
from . import task_parser

TEXT_TOKEN = PLACEHOLDERS["text"]
"""Placeholder for the passage in the prompt (``<text>``, one token of the tiny tokenizer)."""

NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key?"
KEY_RANGE = (10000, 99999)
"""Pass keys are 5-digit numbers in this closed range."""

SPLITS = {"train": 0, "test": 1}
GENERATOR_VERSION = 1
"""Bumped whenever the same arguments would give different passages."""

MIN_TOKENS = PASSKEY_MIN_TOKENS
"""Smallest passage allowed: the needle (about 20 tokens) plus room for filler on both sides."""
check_lengths = check_passkey_lengths

_NOUNS = (
    "man woman child dog cat bird horse fish tree flower garden house room door window table chair "
    "book letter paper pen street road bridge river lake mountain forest field city village station "
    "train car bus boat teacher student doctor farmer driver artist writer friend neighbour camera "
    "picture painting song story idea plan morning evening night rain snow wind sun moon star sky "
    "cloud island beach kitchen bread coffee water apple market shop office school library museum "
    "game ball team player ticket box bag clock"
).split()
_ADJECTIVES = (
    "small large old new young bright dark quiet loud happy sad quick slow warm cold long short "
    "simple beautiful strange famous empty full heavy light clean busy early late wooden round "
    "narrow wide careful friendly green blue yellow red"
).split()
_VERBS = (
    "sees finds carries opens closes watches follows describes explains builds reads writes paints "
    "moves changes answers visits helps needs brings leaves holds pushes pulls cleans likes chooses"
).split()
_SUBJECTS = ("She", "He", "Someone", "Nobody", "Everyone", "The teacher", "My friend", "Our neighbour")
_ADVERBIALS = (
    "in the morning|after lunch|every day|near the station|without a word|before the rain starts|"
    "with great care|again and again|during the summer|on the left side|behind the house|"
    "under the table|across the street|next to the window|at the end of the road|since last year|"
    "because it was late|while everyone was sleeping"
).split("|")
_TEMPLATES = (
    "The {adj} {noun} {verb} the {noun2} {adv}.",
    "The {noun} {verb} {a_adj} {noun2}.",
    "{subj} {verb} the {adj} {noun} {adv}.",
    "The {noun} is {adj}.",
    "The {noun} is {adj} and the {noun2} is {adj2}.",
    "There is {a_adj} {noun} {adv}.",
    "{A_adj} {noun} {verb} the {noun2}.",
    "Nobody knows why the {noun} is so {adj}.",
    "Who {verb} the {adj} {noun}?",
)
_SHORT_SENTENCES = (
    "Again.", "Yes.", "All right.", "It is late.", "Be quiet.", "The sky is blue.", "The sun is yellow.",
    "The grass is green.", "Here we go.", "There and back again.",
)
"""Top-ups that bring a passage to its exact length; with the tiny tokenizer they cost 3 to 9 tokens
(after a space), and sums of 3, 4 and 5 fill every gap of 3 or more tokens exactly."""

_CHUNK = 32  # filler sentences drawn and tokenized at once


def key_split(key: int) -> str:
    """The split pass key ``key`` belongs to: ``"test"`` when its 1-byte BLAKE2b digest is odd."""
    return "test" if hashlib.blake2b(str(key).encode(), digest_size=1).digest()[0] % 2 else "train"


@functools.cache
def split_keys(split: str) -> tuple[int, ...]:
    """All pass keys of ``split``, ascending (about 45,000 each)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return tuple(k for k in range(KEY_RANGE[0], KEY_RANGE[1] + 1) if key_split(k) == split)


def filler_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` filler sentences from the templates and word lists (no digits, never "pass key")."""
    slots = (_TEMPLATES, _NOUNS, _NOUNS[:-1], _ADJECTIVES, _ADJECTIVES[:-1], _VERBS, _SUBJECTS, _ADVERBIALS)
    draws = rng.integers(0, [len(words) for words in slots], size=(n, len(slots)))  # (n, slots), one draw per word
    sentences = []
    for t, n1, n2, a1, a2, v, subj, adv in draws.tolist():
        n2 += n2 >= n1  # two different nouns (and adjectives): the second is drawn from the rest
        a2 += a2 >= a1
        adj = _ADJECTIVES[a1]
        a_adj = f"{'an' if adj[0] in 'aeiou' else 'a'} {adj}"
        sentences.append(_TEMPLATES[t].format(
            noun=_NOUNS[n1], noun2=_NOUNS[n2], adj=adj, a_adj=a_adj, A_adj=a_adj.capitalize(),
            adj2=_ADJECTIVES[a2], verb=_VERBS[v], subj=_SUBJECTS[subj], adv=_ADVERBIALS[adv],
        ))
    return sentences


@functools.cache
def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(None)


def count_tokens(texts: Sequence[str]) -> list[int]:
    """Length of each text in tokens of the tiny tokenizer (no special tokens)."""
    return [len(ids) for ids in _tiny_tokenizer()(list(texts), add_special_tokens=False)["input_ids"]]


@functools.cache
def _short_counts() -> tuple[int, ...]:
    """Token count of each short sentence after a space (how it sits inside a passage)."""
    counts = tuple(count_tokens([" " + s for s in _SHORT_SENTENCES]))
    smallest = min(counts)
    if not all(_fillable(g, counts) for g in range(smallest, 2 * smallest)):
        raise ValueError(f"the short sentences' token counts {counts} cannot fill every gap >= {smallest}")
    return counts


@functools.cache
def _fillable(gap: int, counts: tuple[int, ...]) -> bool:
    """Whether ``gap`` tokens are a sum of ``counts`` (with repetition)."""
    return gap == 0 or any(c <= gap and _fillable(gap - c, counts) for c in set(counts))


def make_passage(rng: np.random.Generator, key: int, n_tokens: int, depth: float) -> tuple[str, float]:
    """A passage of exactly ``n_tokens`` tiny-tokenizer tokens holding the needle for ``key`` once, about
    ``depth`` of the way through the filler; returns ``(passage, realised depth)``.

    Sentences are joined by single spaces. The byte-level pre-tokenizer never merges across a space
    before a word, so a passage's length is the sum of its sentences' lengths (each counted after a
    space, the first without one); the final count is checked against a full encode.
    """
    if n_tokens < MIN_TOKENS:
        raise ValueError(f"n_tokens must be >= {MIN_TOKENS}, got {n_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)
    (needle_count,) = count_tokens([" " + needle])

    # 1. filler up to the budget (every sentence counted as if after a space)
    budget = n_tokens - needle_count
    filler: list[str] = []
    counts: list[int] = []
    total, full = 0, False
    while not full:
        chunk = filler_sentences(rng, _CHUNK)
        for sentence, count in zip(chunk, count_tokens([" " + s for s in chunk])):
            if total + count > budget:
                full = True
                break
            filler.append(sentence)
            counts.append(count)
            total += count

    # 2. the needle at the sentence boundary nearest to `depth` of the filler's tokens
    cumulative = np.concatenate([[0], np.cumsum(counts)])  # (len(filler) + 1,) tokens before boundary k
    at = int(np.argmin(np.abs(cumulative - depth * total)))
    sentences = [*filler[:at], needle, *filler[at:]]
    counts = [*counts[:at], needle_count, *counts[at:]]
    (counts[0],) = count_tokens(sentences[:1])  # the first sentence has no space before it

    # 3. exact length: top up with short sentences anywhere after the first (which keeps its count);
    #    drop a filler sentence when over, or when the gap left is one no top-up can fill (1 or 2 tokens)
    short = _short_counts()
    gap = n_tokens - sum(counts)
    while gap:
        options = [i for i, c in enumerate(short) if c <= gap and _fillable(gap - c, short)]
        if options:
            i = options[rng.integers(len(options))]
            # before the needle with probability `depth`: the realised depth stays near the drawn one
            before = at >= 1 and rng.random() < depth
            pos = int(rng.integers(1, at + 1) if before else rng.integers(at + 1, len(sentences) + 1))
            sentences.insert(pos, _SHORT_SENTENCES[i])
            counts.insert(pos, short[i])
            at += pos <= at
            gap -= short[i]
            continue
        removable = [j for j in range(1, len(sentences)) if j != at]
        if not removable:
            raise ValueError(f"cannot build a passage of exactly {n_tokens} tokens around {needle!r}")
        j = removable[rng.integers(len(removable))]
        del sentences[j]
        gap += counts.pop(j)
        at -= j < at

    passage = " ".join(sentences)
    (actual,) = count_tokens([passage])
    if actual != n_tokens:  # the additivity above does not hold for this tokenizer
        raise RuntimeError(f"passage for key {key} has {actual} tokens, built for {n_tokens}")
    filler_tokens = n_tokens - counts[at]
    return passage, sum(counts[:at]) / filler_tokens


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def make_sample(seed: int, split: str, index: int, min_tokens: int = 256, max_tokens: int = 1024) -> dict:
    """Sample ``index`` of ``split``: a LLaVA record with the passage in ``"text"`` (see the module
    docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = _sample_rng(seed, split, index)
    keys = split_keys(split)
    key = keys[rng.integers(len(keys))]
    n_tokens = int(rng.integers(min_tokens, max_tokens + 1))
    passage, depth = make_passage(rng, key, n_tokens, float(rng.random()))
    return {
        "id": f"passkey-{split}-{index:05d}",
        "text": passage,
        "question_type": "passkey",
        "passkey": str(key),
        "depth": round(depth, 4),
        "text_tokens": n_tokens,
        "conversations": [
            {"from": "human", "value": f"{TEXT_TOKEN}\n{QUESTION}"},
            {"from": "gpt", "value": str(key)},
        ],
    }


def generate_split(
    out: str | Path, split: str, n: int, min_tokens: int = 256, max_tokens: int = 1024, seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write ``n`` samples of ``split`` to ``out/split.json``; returns its path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    check_lengths(min_tokens, max_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        make_sample(seed, split, i, min_tokens=min_tokens, max_tokens=max_tokens)
        for i in tqdm(range(n), desc=f"passkey {split}", unit="sample", disable=not progress)
    ]
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    return json_path


def make_passkey_task(
    out: str | Path, n_train: int = 2000, n_test: int = 500, min_tokens: int = 256, max_tokens: int = 1024,
    seed: int = 0, progress: bool = True,
) -> dict[str, Path]:
    """Generate both splits and ``meta.json``; returns ``{"train": json_path, "test": json_path}``."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_lengths(min_tokens, max_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        split: generate_split(out, split, n, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed, progress=progress)
        for split, n in (("train", n_train), ("test", n_test))
    }
    tokenizer_sha = hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    meta = {
        "generator": "llava_deft.tasks.passkey", "version": GENERATOR_VERSION, "seed": seed,
        "n_train": n_train, "n_test": n_test, "min_tokens": min_tokens, "max_tokens": max_tokens,
        "text_placeholder": TEXT_TOKEN, "needle": NEEDLE, "question": QUESTION, "key_range": list(KEY_RANGE),
        "key_split": "test iff blake2b(str(key), digest_size=1)[0] is odd",
        "length_unit": "tokens of the tiny tokenizer (llava_deft/assets/tiny_tokenizer), no special tokens",
        "tokenizer_json_sha256": tokenizer_sha, "numpy": np.__version__, "tokenizers": tokenizers.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = task_parser(__doc__, "output folder (train.json, test.json, meta.json)",
                         "train passages (1 question each)", "test passages (1 question each)")
    parser.add_argument("--min-tokens", type=int, default=256, help="shortest passage, in tiny-tokenizer tokens")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest passage, in tiny-tokenizer tokens")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    paths = make_passkey_task(
        args.out, n_train=args.n_train, n_test=args.n_test, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, seed=args.seed,
    )
    print(
        f"wrote {args.n_train} train / {args.n_test} test passages ({args.min_tokens}-{args.max_tokens} tokens) "
        f"to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return paths
