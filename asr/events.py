"""The events a speech stream emits, as the JSON-ready dicts that go on the wire.

They are part of the server's protocol, which protocol.py defines and re-exports these from: asr/ imports
nothing outside asr/, so its own events are built here. Times are seconds on the stream's audio timeline.
"""

from typing import Any, Literal, TypedDict

Event = dict[str, Any]  # any event, as it travels through the server: a JSON-ready dict

OVERLOADED = "overloaded"  # error code: an utterance could not be queued; its final comes with empty text
DECODE_FAILED = "decode_failed"  # error code: an utterance's decode failed; its final comes with empty text


class SpeechStartedEvent(TypedDict):
    type: Literal["speech.started"]
    utterance: int  # 1, 2, 3... in the session
    start: float


class TranscriptPartialEvent(TypedDict):
    type: Literal["transcript.partial"]
    utterance: int
    text: str  # the whole current hypothesis
    stable: str  # the word prefix on which the last two hypotheses agree
    start: float


class SpeechStoppedEvent(TypedDict):
    type: Literal["speech.stopped"]
    utterance: int
    end: float


class Word(TypedDict):
    word: str
    start: float
    end: float
    probability: float


class TranscriptFinalEvent(TypedDict):
    type: Literal["transcript.final"]
    utterance: int
    text: str  # empty when the utterance held no credible speech
    start: float
    end: float
    language: str | None
    words: list[Word]
    # Why the utterance ended: "endpoint" (its pause), "split" (the length limit, the speaker went on),
    # "flush" (the client asked for its final at once) or "end" (of the session).
    cause: str


class ErrorEvent(TypedDict):
    type: Literal["error"]
    code: str  # one of protocol.ERRORS
    message: str


def speech_started(utterance: int, start: float) -> SpeechStartedEvent:
    return {"type": "speech.started", "utterance": utterance, "start": start}


def transcript_partial(utterance: int, text: str, stable: str, start: float) -> TranscriptPartialEvent:
    return {"type": "transcript.partial", "utterance": utterance, "text": text, "stable": stable, "start": start}


def speech_stopped(utterance: int, end: float) -> SpeechStoppedEvent:
    return {"type": "speech.stopped", "utterance": utterance, "end": end}


def word(text: str, start: float, end: float, probability: float) -> Word:
    return {"word": text, "start": start, "end": end, "probability": probability}


def transcript_final(utterance: int, text: str, start: float, end: float, language: str | None,
                     words: list[Word], cause: str = "endpoint") -> TranscriptFinalEvent:
    return {"type": "transcript.final", "utterance": utterance, "text": text, "start": start, "end": end,
            "language": language, "words": words, "cause": cause}


def error(code: str, message: str) -> ErrorEvent:
    return {"type": "error", "code": code, "message": message}
