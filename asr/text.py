"""What Whisper's output is judged and tidied by, and the prompt it continues: loops cut, lone digits
spelt, silence, hallucinations and a repeated prompt rejected. asr/engine.py decodes; this module
holds the rules for the text that comes out and the tokens that go in."""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio

_NO_SPEECH = 0.6  # faster-whisper's thresholds: no speech when both hold
_LOW_LOGPROB = -1.0
_REPETITIVE = 2.4  # compression ratio of a repetition loop
# What Whisper tends to say over near-silence; dropped only when the model itself is unsure.
_HALLUCINATIONS = {
    "you", "thank you", "thanks", "thanks for watching", "thank you for watching", "bye", "so",
    "please subscribe", "subtitles by the amara org community", "okay", "oh", "uh", "um",
}
_LONE_DIGIT = re.compile(r"(\d)([.,!?]?)")
_LONE_DIGITS = re.compile(r"\d[.!?]?|(?:\d[.,!?]? )+\d[.,!?]?")  # one, or a list of them
_UNSPACED = {"zh", "ja", "th", "lo", "my", "yue"}  # as faster-whisper splits their words
_DIGIT_NAMES = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")
# Said alone, these are a whole answer, which Whisper may doubt there and still hear right.
_ANSWERS = frozenset(name.lower() for name in _DIGIT_NAMES) | {"yes", "no", "yeah", "yep", "nope", "okay", "ok"}


class Decoded(NamedTuple):
    """One generated sequence, as the rules below judge it."""

    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float


def silent(avg_logprob: float, no_speech_prob: float) -> bool:
    """Whisper's own verdict of no speech: the no-speech token likely and the text improbable."""
    return no_speech_prob > _NO_SPEECH and avg_logprob < _LOW_LOGPROB


def settled(decoded: Decoded, tokenizer: Tokenizer) -> bool:
    """No fallback needed: confidently silent, or neither a loop nor improbable."""
    if silent(decoded.avg_logprob, decoded.no_speech_prob):
        return True
    return (get_compression_ratio(tokenizer.decode(decoded.tokens)) <= _REPETITIVE
            and decoded.avg_logprob >= _LOW_LOGPROB)


def rejected(text: str, avg_logprob: float, no_speech_prob: float) -> bool:
    """No credible speech: nothing, silence, a loop left after every fallback, or a stock phrase of
    near-silence that the model is unsure of."""
    if wordless(text):  # "..." alone: Whisper's dots over a pause it could not read, or a prompt's copied
        return True
    if silent(avg_logprob, no_speech_prob):
        return True
    if get_compression_ratio(text) > _REPETITIVE:  # still a loop after every fallback
        return True
    if normalize(text) in _HALLUCINATIONS:
        return no_speech_prob > 0.3 or avg_logprob < -0.7
    return False


def cut_loop(tokens: list[int], min_period: int = 5) -> list[int]:
    """Whisper's loop: the output ends with the same block of tokens two or more times. Keep one.

    A speaker rarely repeats five or more tokens verbatim back to back, or three or four tokens three
    times; the decoder, given a little trailing silence, does it readily. A last copy cut short by the
    length cap counts too, and so does a copy whose first token differs (a sentence said again with a
    capital, "yet these thoughts ... Yet these thoughts ...").
    """
    return tokens[:_loop_start(tokens, 3, min_period, respelt=True)]


def cut_word_loop(tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    """The same loop in words, with their marks: four or more words said twice at the end, or two or three
    words three times. Keep one copy.

    The decoder may spell a copy in other tokens than the one before (a word split another way, "20" for
    " 20"), which `cut_loop` cannot see: "20th century research issue. 20th century research issue. 20th
    century research" came back from a burst at 16 streams. Languages written without spaces are left to
    `cut_loop`.
    """
    if tokenizer.language_code in _UNSPACED:
        return tokens
    words, pieces = tokenizer.split_to_word_tokens(tokens)
    said, starts, position = [], [], 0
    for word, piece in zip(words, pieces):
        if said and punctuation(word):  # a mark belongs to its word: "it is," is not "it is."
            said[-1] += word.strip()
        elif word.strip():
            said.append(word.strip().casefold())
            starts.append(position)
        position += len(piece)
    keep = _loop_start(said, 2, 4, respelt=False)
    return tokens if keep == len(said) else tokens[:starts[keep]]


def _loop_start(items: list, shortest: int, min_period: int, respelt: bool) -> int:
    """How many of `items` come before their tail's repeats: a block of at least `min_period` items twice or
    of at least `shortest` three times, the last copy perhaps cut short; `respelt`, the second copy's first
    item may differ."""
    n, keep = len(items), len(items)
    for period in range(shortest, n // 2 + 1):
        copies = 2 if period >= min_period else 3  # a shorter block is a loop at its third copy
        i = n - 1
        while i >= period and items[i] == items[i - period]:
            i -= 1
        # items[i + 1 - period : n] repeats with this period; its first copy ends at i + 1.
        repeated = n - (i + 1 - period)
        if repeated >= copies * period:
            keep = min(keep, i + 1)
        elif respelt and copies == 2 and repeated == 2 * period - 1:  # items[i] starts the second copy, respelt
            keep = min(keep, i)
    return keep


def spell_lone_digits(text: str) -> str:
    """Digits said on their own, as their words: "3" becomes "Three", "1." "One.", "1, 2, 3." "One, two,
    three.", "3 4" "Three four".

    With no sentence around them, Whisper writes lone numbers as digits about as often as words:
    "one", "two", "three" said with pauses came out "1.", "Two.", "3", and said together in babble "1, 2,
    3." (greedy, "1 2 3"), where offline, over the whole recording, it wrote "One, two, three." Streaming
    cuts speech at pauses, so it meets lone numbers that offline never does; spelling them restores the
    offline text and the style (AP's) that writes single digits as words. Text with anything but single
    digits is left as it is.
    """
    if not _LONE_DIGITS.fullmatch(text):
        return text
    spelt, capital = [], True
    for digit, mark in _LONE_DIGIT.findall(text):
        name = _DIGIT_NAMES[int(digit)]
        spelt.append((name if capital else name.lower()) + mark)
        capital = mark in (".", "!", "?")
    return " ".join(spelt)


def answer(text: str, language: str) -> bool:
    """`text` is an answer: numbers ("3", in English "Six.", "One, two"), or in English yes, no or okay."""
    words = [w.strip(".,!?;:").lower() for w in text.split()]
    return bool(words) and all(w.isdigit() or (language == "en" and w in _ANSWERS) for w in words)


def wordless(text: str) -> bool:
    """Not one letter or digit, in any script: nothing said."""
    return not any(c.isalnum() for c in text)


def punctuation(text: str) -> bool:
    """Punctuation marks only, with no letter, digit or part of one (a CJK character's first byte)."""
    marks = text.strip()
    return bool(marks) and all(unicodedata.category(c).startswith("P") for c in marks)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def repeats(tokenizer: Tokenizer, tokens: list[int], context: list[int]) -> bool:
    """The decoded text is nothing but words of the context, in its order, or no word at all (a prompt of
    "... ..." is answered "... ..."): Whisper said the prompt again."""
    if tokens and wordless(tokenizer.decode(tokens)):
        return True
    said = normalize(tokenizer.decode(tokens))
    return bool(said) and f" {said} " in f" {normalize(tokenizer.decode(context))} "


def previous_tokens(tokenizer: Tokenizer, text: str, limit: int) -> list[int]:
    """The last `limit` tokens of `text`, as faster-whisper keeps the previous text."""
    if not (limit and text.strip()):
        return []
    return tokenizer.encode(" " + text.strip())[-limit:]


def prompt(tokenizer: Tokenizer, previous: list[int] = ()) -> list[int]:
    """The decoder's prompt: the previous text, if any, then the start of a transcript without timestamps."""
    head = [tokenizer.sot_prev, *previous] if previous else []
    return head + list(tokenizer.sot_sequence) + [tokenizer.no_timestamps]


def max_length(tokenizer: Tokenizer, seconds: float, previous: list[int] = ()) -> int:
    # Speech runs under ~5 tokens a second: a longer output is a loop, cut short. The prompt counts.
    return min(448, len(prompt(tokenizer, previous)) + min(224, 16 + int(12 * seconds)))
