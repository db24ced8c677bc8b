"""Train the tiny byte-level BPE tokenizer committed under llava_deft/assets/tiny_tokenizer/.

Nothing is downloaded: the corpus is the easy-VQA train questions and answers (shipped inside the
``easy_vqa`` package) plus a few hundred generic English sentences generated here from fixed word
lists, so the vocabulary covers the task and ordinary text; anything else (unicode, code, numbers)
still encodes through the 256 byte-level base tokens.

Run (deterministic: the same files come out every time):

    .venv/bin/python scripts/build_tokenizer.py [--out llava_deft/assets/tiny_tokenizer] [--vocab-size 1500]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import easy_vqa
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llava_deft" / "assets" / "tiny_tokenizer"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MEDIA_TOKENS = {"image": "<image>", "video": "<video>", "audio": "<audio>", "text": "<text>"}
# ids 0..6 in this order; the media placeholders are also named extra special tokens (tok.image_token).
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, MEDIA_TOKENS["image"], MEDIA_TOKENS["video"], MEDIA_TOKENS["audio"]]
# Placeholders added after the BPE vocabulary was first committed: appended after training, so they take
# the next free ids (``<text>``: 1162) and every earlier id (and every checkpoint's embedding rows) stays.
APPENDED_TOKENS = [MEDIA_TOKENS["text"]]

# Vicuna-v1-style template (LLaVA v1.5's "USER: ... ASSISTANT: ..."). The assistant turn is
#   "ASSISTANT:" + {% generation %}" " + answer + eos{% endgeneration %} + "\n"
# so the generation prompt (ending with "ASSISTANT:") is a token-exact prefix of the training sequence:
# the byte-level pre-tokenizer always splits ":" from " answer", and the assistant mask covers the
# answer and the eos (the model learns to stop) but not the newline after it.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
    "{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT:' -}}"
    "{% generation %}{{- ' ' + message['content'] + eos_token -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception(\"unknown role '\" + message['role'] + \"'; expected 'system', 'user' or 'assistant'\") -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_NOUNS = (
    "man woman child dog cat bird horse fish tree flower garden house room door window table chair "
    "book letter paper pen street road bridge river lake mountain forest field city village station "
    "train car bus boat plane teacher student doctor farmer driver artist writer friend family "
    "brother sister mother father neighbour computer phone camera screen picture photo painting "
    "song music movie story question answer problem idea plan reason result number word sentence "
    "language morning evening night weather rain snow wind sun moon star sky cloud island beach "
    "kitchen bread coffee water apple orange market shop office school library museum hospital "
    "game ball team player match ticket box bag key clock minute hour week month year"
).split()
_ADJECTIVES = (
    "small large old new young bright dark quiet loud happy sad quick slow warm cold long short "
    "simple difficult beautiful strange famous empty full heavy light clean busy early late "
    "wooden round square narrow wide careful friendly important different"
).split()
_VERBS = (
    "sees finds carries opens closes watches follows describes explains remembers builds reads "
    "writes paints moves changes counts answers visits helps needs brings leaves holds pushes "
    "pulls cleans likes chooses"
).split()
_PLACES = (
    "in the morning|after lunch|every day|near the station|without a word|before the rain starts|"
    "at seven o'clock|with great care|again and again|for about twenty minutes|during the summer|"
    "on the left side|behind the house|under the table|across the street|next to the window|"
    "at the end of the road|since last year|because it was late|while everyone was sleeping"
).split("|")
_ENDINGS = [".", ".", ".", "!", "?", "...", ";"]
_EXTRA = [
    "How many objects are in the image?",
    "Describe the image in one sentence.",
    "What is shown on the left and on the right?",
    "Is there a person in this photo? Answer yes or no.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 3.14 appear in text.",
    "Please answer the question using a single word or phrase.",
    "A picture is worth a thousand words; a token is worth much less.",
    "User: hello! Assistant: hi, how can I help you today?",
    "The video shows a person walking; the audio is a short spoken sentence.",
    "Common words: of and to is you that it he was for on are as with his they at be have from or one "
    "had by but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time has look "
    "two more go could people than first been call who its now long down did get come made may part "
    "over just also after know think because good give most very through back much where only those "
    "should well between never under last right must still world against however another both few",
]


def generic_sentences(n: int = 600) -> list[str]:
    """``_EXTRA`` plus ``n`` deterministic English sentences built from the word lists by fixed strides
    (coprime with each list's length, so every word appears)."""
    sentences = list(_EXTRA)
    for i in range(n):
        a1, a2 = _ADJECTIVES[(3 * i) % len(_ADJECTIVES)], _ADJECTIVES[(7 * i + 5) % len(_ADJECTIVES)]
        n1, n2 = _NOUNS[(5 * i) % len(_NOUNS)], _NOUNS[(11 * i + 3) % len(_NOUNS)]
        verb, place = _VERBS[(13 * i) % len(_VERBS)], _PLACES[(17 * i) % len(_PLACES)]
        ending = _ENDINGS[i % len(_ENDINGS)]
        det = ("The", "A", "My", "Our", "This", "Every")[i % 6]
        sentences.append(f"{det} {a1} {n1} {verb} the {a2} {n2} {place}{ending}")
    return sentences


def corpus() -> list[str]:
    """The training text, in a fixed order: the easy-VQA train pairs in the chat format (so "USER:",
    "ASSISTANT:" and question words after "<image>\\n" become merges), the answer vocabulary, then
    the generic sentences."""
    questions, answers, _ = easy_vqa.get_train_questions()
    pairs = [f"USER: <image>\n{q}\nASSISTANT: {a}" for q, a in zip(questions, answers)]
    return pairs + list(easy_vqa.get_answers()) + generic_sentences()


def build(out: Path, vocab_size: int = 1500) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer, wrap it as a ``PreTrainedTokenizerFast`` with the chat template, save it."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # No prefix space: " " + answer in the template carries its own space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in APPENDED_TOKENS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={f"{m}_token": t for m, t in MEDIA_TOKENS.items()},
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=1500)
    args = parser.parse_args(argv)
    hf = build(args.out, args.vocab_size)
    print(f"saved {len(hf)} tokens to {args.out}")


if __name__ == "__main__":
    main()
