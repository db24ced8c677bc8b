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
(``load_tokenizer(None)``, no special tokens), drawn uniformly in ``[min_tokens, max_tokens]``. Nothing
caps the length: 2,048- to 8,192-token passages take about 6 and 22 ms each (one CPU core).

Multi-needle (key-value) retrieval, ``needles=k`` with ``k > 1`` (``--needles k``): the passage holds
k needles ``The pass key of the <label> is <key>. Remember it.`` at independent uniform depths, with k
distinct labels of :data:`LABELS` (colour + noun, e.g. ``red phone``; no label noun is a filler word)
and k distinct keys, all of the split. The question asks for one of them, so a model has to keep
every needle, not only the most recent one (a KV-cache eviction benchmark recency alone cannot win)::

    {"id": "passkey-test-00000", "text": "Our neighbour brings the small bread under the table. ... The pass
     key of the black screen is 57188. Remember it. ... The pass key of the green screen is 90022. Remember it. ...",
     "question_type": "passkey", "passkey": "57188", "depth": 0.0592, "text_tokens": 7925, "needles": 2,
     "label": "black screen", "distractors": ["90022"],
     "conversations": [{"from": "human", "value": "<text>\\nWhat is the pass key of the black screen?"},
                       {"from": "gpt", "value": "57188"}]}

(``make_sample(0, "test", 0, 2048, 8192, needles=2)``.) ``passkey`` and ``depth`` are the asked needle's
key and realised depth (the share of the rest of the passage, filler and other needles, before it);
``distractors`` are the other keys in passage order.
A passage with k needles needs ``min_tokens >= 64 + 32 (k - 1)``; k is at most 64 (one per label).
``needles=1`` (the default) is the single-needle task above: the same records, byte for byte, without
the ``needles``/``label``/``distractors`` keys.

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
    .venv/bin/python scripts/make_passkey_task.py --out data/passkey_long --n-train 0 --n-test 300 \\
        --min-tokens 2048 --max-tokens 8192 --needles 4                 # the long multi-needle benchmark
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..config.train import (
    PASSKEY_MAX_NEEDLES,
    PASSKEY_MIN_TOKENS,
    check_passkey_lengths,
    check_passkey_needles,
    passkey_min_tokens,
)
from ..model.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from ..modality import PLACEHOLDERS
from . import task_parser

TEXT_TOKEN = PLACEHOLDERS["text"]
"""Placeholder for the passage in the prompt (``<text>``, one token of the tiny tokenizer)."""

NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key?"
LABELLED_NEEDLE = "The pass key of the {label} is {key}. Remember it."
LABELLED_QUESTION = "What is the pass key of the {label}?"
"""Needle and question of a passage with ``needles > 1``: each needle names its label."""
KEY_RANGE = (10000, 99999)
"""Pass keys are 5-digit numbers in this closed range."""

SPLITS = {"train": 0, "test": 1}
GENERATOR_VERSION = 1
"""Bumped whenever the same arguments would give different passages."""

MIN_TOKENS = PASSKEY_MIN_TOKENS
"""Smallest passage allowed: the needle (about 20 tokens) plus room for filler on both sides."""
check_lengths = check_passkey_lengths

_LABEL_COLOURS = ("red", "blue", "green", "yellow", "black", "brown", "orange", "gray")
_LABEL_NOUNS = ("phone", "plane", "fox", "screen", "computer", "photo", "square", "circle")
LABELS = tuple(f"{colour} {noun}" for colour in _LABEL_COLOURS for noun in _LABEL_NOUNS)
"""The 64 labels of a multi-needle passage's needles (colour + noun, one tiny-tokenizer token each).
No label noun is a word of the filler, so a label occurs in a passage only in its needle."""
if len(LABELS) != PASSKEY_MAX_NEEDLES:
    raise RuntimeError(f"{len(LABELS)} labels, but config.train.PASSKEY_MAX_NEEDLES is {PASSKEY_MAX_NEEDLES}")

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
    """Length of each text in tokens of the tiny tokenizer (no special tokens).

    Through the Rust tokenizer itself (what the wrapper's ``__call__`` runs, without its warning that a
    passage is longer than ``model_max_length``: a length here is only counted, never fed to a model)."""
    return [len(e.ids) for e in _tiny_tokenizer().backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]


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
    passage, (realised,) = _build_passage(rng, [NEEDLE.format(key=key)], n_tokens, [depth])
    return passage, realised


def make_multi_passage(
    rng: np.random.Generator, needles: Sequence[str], n_tokens: int, depths: Sequence[float],
) -> tuple[str, list[float]]:
    """A passage of exactly ``n_tokens`` tiny-tokenizer tokens holding each sentence of ``needles`` once,
    needle ``j`` about ``depths[j]`` of the way through the filler (needles drawn at the same boundary
    keep the order of their depths); returns ``(passage, realised depth of each needle)``, a needle's
    realised depth being the share of the rest of the passage (filler and other needles) before it.
    With one needle this is :func:`make_passage` for that needle."""
    if not needles or len(needles) != len(depths):
        raise ValueError(f"needles and depths must be non-empty and of one length, got {len(needles)} and {len(depths)}")
    if n_tokens < passkey_min_tokens(len(needles)):
        raise ValueError(f"n_tokens must be >= {passkey_min_tokens(len(needles))} for {len(needles)} needles, got {n_tokens}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must be in [0, 1], got {bad[0]}")
    return _build_passage(rng, list(needles), n_tokens, [float(d) for d in depths])


def _build_passage(
    rng: np.random.Generator, needles: list[str], n_tokens: int, depths: list[float],
) -> tuple[str, list[float]]:
    """:func:`make_multi_passage` without the argument checks. With one needle it draws from ``rng``
    exactly as the single-needle generator always has (the same passage for the same arguments)."""
    needle_counts = count_tokens([" " + n for n in needles])

    # 1. filler up to the budget (every sentence counted as if after a space)
    budget = n_tokens - sum(needle_counts)
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

    # 2. each needle at the sentence boundary nearest to its depth of the filler's tokens; `where[j]` is
    #    needle j's index in `sentences`
    cumulative = np.concatenate([[0], np.cumsum(counts)])  # (len(filler) + 1,) tokens before boundary k
    ats = [int(np.argmin(np.abs(cumulative - depth * total))) for depth in depths]
    sentences, where = list(filler), [0] * len(needles)
    for offset, j in enumerate(sorted(range(len(needles)), key=lambda j: (ats[j], depths[j], j))):
        where[j] = ats[j] + offset  # after the needles inserted before it, which sit at lower boundaries
        sentences.insert(where[j], needles[j])
        counts.insert(where[j], needle_counts[j])
    (counts[0],) = count_tokens(sentences[:1])  # the first sentence has no space before it

    # 3. exact length: top up with short sentences anywhere after the first (which keeps its count);
    #    drop a filler sentence when over, or when the gap left is one no top-up can fill (1 or 2 tokens)
    short = _short_counts()
    gap = n_tokens - sum(counts)
    while gap:
        options = [i for i, c in enumerate(short) if c <= gap and _fillable(gap - c, short)]
        if options:
            i = options[rng.integers(len(options))]
            if len(needles) == 1:
                # before the needle with probability `depth`: the realised depth stays near the drawn one
                (at,), (depth,) = where, depths
                before = at >= 1 and rng.random() < depth
                pos = int(rng.integers(1, at + 1) if before else rng.integers(at + 1, len(sentences) + 1))
            else:  # any boundary after the first sentence: before needle j with about its depth's chance
                pos = int(rng.integers(1, len(sentences) + 1))
            sentences.insert(pos, _SHORT_SENTENCES[i])
            counts.insert(pos, short[i])
            where = [at + (pos <= at) for at in where]
            gap -= short[i]
            continue
        removable = [j for j in range(1, len(sentences)) if j not in where]
        if not removable:
            raise ValueError(f"cannot build a passage of exactly {n_tokens} tokens around {', '.join(map(repr, needles))}")
        j = removable[rng.integers(len(removable))]
        del sentences[j]
        gap += counts.pop(j)
        where = [at - (j < at) for at in where]

    passage = " ".join(sentences)
    (actual,) = count_tokens([passage])
    if actual != n_tokens:  # the additivity above does not hold for this tokenizer
        raise RuntimeError(f"passage for {', '.join(map(repr, needles))} has {actual} tokens, built for {n_tokens}")
    return passage, [sum(counts[:at]) / (n_tokens - counts[at]) for at in where]


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def make_sample(
    seed: int, split: str, index: int, min_tokens: int = 256, max_tokens: int = 1024, needles: int = 1,
) -> dict:
    """Sample ``index`` of ``split``: a LLaVA record with the passage in ``"text"`` (see the module
    docstring); ``needles > 1`` hides that many labelled keys and asks for one of them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    check_passkey_needles(needles)
    rng = _sample_rng(seed, split, index)
    keys = split_keys(split)
    if needles > 1:
        return _multi_needle_sample(rng, keys, split, index, min_tokens, max_tokens, needles)
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


def _multi_needle_sample(
    rng: np.random.Generator, keys: tuple[int, ...], split: str, index: int, min_tokens: int, max_tokens: int,
    needles: int,
) -> dict:
    """:func:`make_sample` for ``needles > 1``: distinct keys of the split, distinct labels, one asked."""
    picked = [keys[k] for k in rng.choice(len(keys), size=needles, replace=False).tolist()]
    labels = [LABELS[k] for k in rng.choice(len(LABELS), size=needles, replace=False).tolist()]
    asked = int(rng.integers(needles))
    n_tokens = int(rng.integers(min_tokens, max_tokens + 1))
    sentences = [LABELLED_NEEDLE.format(label=label, key=key) for label, key in zip(labels, picked)]
    passage, depths = make_multi_passage(rng, sentences, n_tokens, rng.random(needles).tolist())
    in_order = sorted(range(needles), key=depths.__getitem__)  # the needles as the passage holds them
    return {
        "id": f"passkey-{split}-{index:05d}",
        "text": passage,
        "question_type": "passkey",
        "passkey": str(picked[asked]),
        "depth": round(depths[asked], 4),
        "text_tokens": n_tokens,
        "needles": needles,
        "label": labels[asked],
        "distractors": [str(picked[j]) for j in in_order if j != asked],
        "conversations": [
            {"from": "human", "value": f"{TEXT_TOKEN}\n{LABELLED_QUESTION.format(label=labels[asked])}"},
            {"from": "gpt", "value": str(picked[asked])},
        ],
    }


def generate_split(
    out: str | Path, split: str, n: int, min_tokens: int = 256, max_tokens: int = 1024, seed: int = 0,
    progress: bool = True, needles: int = 1,
) -> Path:
    """Write ``n`` samples of ``split`` (``needles`` needles each) to ``out/split.json``; returns its path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    check_lengths(min_tokens, max_tokens, needles)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        make_sample(seed, split, i, min_tokens=min_tokens, max_tokens=max_tokens, needles=needles)
        for i in tqdm(range(n), desc=f"passkey {split}", unit="sample", disable=not progress)
    ]
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    return json_path


def make_passkey_task(
    out: str | Path, n_train: int = 2000, n_test: int = 500, min_tokens: int = 256, max_tokens: int = 1024,
    seed: int = 0, progress: bool = True, needles: int = 1,
) -> dict[str, Path]:
    """Generate both splits and ``meta.json``; returns ``{"train": json_path, "test": json_path}``."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_lengths(min_tokens, max_tokens, needles)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        split: generate_split(out, split, n, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed,
                              progress=progress, needles=needles)
        for split, n in (("train", n_train), ("test", n_test))
    }
    tokenizer_sha = hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    multi = needles > 1
    meta = {
        "generator": "llava_deft.tasks.passkey", "version": GENERATOR_VERSION, "seed": seed,
        "n_train": n_train, "n_test": n_test, "min_tokens": min_tokens, "max_tokens": max_tokens, "needles": needles,
        "text_placeholder": TEXT_TOKEN, "needle": LABELLED_NEEDLE if multi else NEEDLE,
        "question": LABELLED_QUESTION if multi else QUESTION, **({"labels": list(LABELS)} if multi else {}),
        "key_range": list(KEY_RANGE),
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
    parser.add_argument("--needles", type=int, default=1,
                        help="needles per passage: 1 (one key) or k > 1 (k labelled keys, the question asks for one)")
    args = parser.parse_args(argv)
    try:
        check_lengths(args.min_tokens, args.max_tokens, args.needles)
    except ValueError as err:
        parser.error(re.sub(r"\b(min_tokens|max_tokens|needles)\b", lambda m: "--" + m[1].replace("_", "-"), str(err)))
    t0 = time.perf_counter()
    paths = make_passkey_task(
        args.out, n_train=args.n_train, n_test=args.n_test, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, seed=args.seed, needles=args.needles,
    )
    needles = f", {args.needles} needles each" if args.needles > 1 else ""
    print(
        f"wrote {args.n_train} train / {args.n_test} test passages ({args.min_tokens}-{args.max_tokens} tokens"
        f"{needles}) to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return paths
