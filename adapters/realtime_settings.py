"""An OpenAI Realtime transcription session's settings: read from GA `session.update` (and client secrets,
WebRTC calls) or beta `transcription_session.update`, reported back in either shape, made into our
session options. Only the fields present change; what we cannot honour is clamped and reported as applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from asr.audio import MAX_RATE, MIN_RATE
from config import Config
from errors import quoted

PCM_RATE = 24000  # OpenAI's audio/pcm and pcm16
G711_RATE = 8000
GA_FORMATS = {"audio/pcm": "pcm_s16le", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}  # -> asr.audio.RawAudio
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
LOGPROBS = "item.input_audio_transcription.logprobs"
TURN_TYPES = ("server_vad", "semantic_vad")  # semantic_vad is served by the same VAD, its eagerness echoed
# Models whose deltas OpenAI streams while the speaker talks; the others' come when the turn is transcribed.
LIVE_MODELS = frozenset({"gpt-realtime-whisper", "gpt-live-transcribe"})
ENDPOINT_MS = (100, 5000)  # silence_duration_ms, clamped to what our endpoint takes
PREFIX_MS = (0, 2000)
THRESHOLD = (0.1, 0.95)  # Silero's probability: outside this, everything (or nothing) is speech


class SettingsError(ValueError):
    """A setting the session cannot take: OpenAI's `error` (or a 400 on the HTTP routes)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


@dataclass(frozen=True)
class Turns:
    """Server VAD: turns end on their own."""

    type: str
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    eagerness: str | None = None  # semantic_vad's, echoed


@dataclass(frozen=True)
class Settings:
    format: str = "audio/pcm"
    rate: int = PCM_RATE
    model: str | None = None
    language: str | None = None  # None: the server's default
    prompt: str = ""
    turns: Turns | None = None  # None: the client commits each turn (turn_detection null)
    noise_reduction: Mapping[str, Any] | None = None  # accepted and echoed; the VAD needs none
    logprobs: bool = False
    served_model: str = field(default="", compare=False)  # the server's own model, a "live" name too

    @property
    def encoding(self) -> str:
        return GA_FORMATS[self.format]

    @property
    def live(self) -> bool:
        """Deltas while the speaker talks (the partials' stable words), rather than once the turn is final."""
        return self.model is None or self.model in LIVE_MODELS or self.model == self.served_model


def defaults(config: Config, served_model: str) -> Settings:
    """A new session's: server VAD with the server's own endpoint, threshold and pre-roll."""
    return Settings(turns=Turns("server_vad", config.vad_threshold, config.preroll_ms, config.endpoint_ms),
                    served_model=served_model)


# Reading ------------------------------------------------------------------------------------------

def apply_ga(settings: Settings, session: Any, languages: frozenset[str]) -> Settings:
    """A GA `session` object (session.update, client_secrets, a call's session part) over `settings`."""
    session = _object(session, "session")
    kind = session.get("type")
    if kind not in (None, "transcription", "realtime"):  # a realtime session's audio input is transcribed too
        raise SettingsError("session.type", f"session.type must be 'transcription', not {quoted(kind)}")
    if "include" in session:
        settings = replace(settings, logprobs=_logprobs(session["include"], "session.include"))
    audio = _object(session.get("audio"), "session.audio")
    audio_input = _object(audio.get("input"), "session.audio.input")
    at = "session.audio.input"
    if "format" in audio_input:
        settings = _format(settings, audio_input["format"], f"{at}.format")
    if "transcription" in audio_input:
        settings = _transcription(settings, audio_input["transcription"], f"{at}.transcription", languages)
    if "turn_detection" in audio_input:
        settings = _turns(settings, audio_input["turn_detection"], f"{at}.turn_detection")
    if "noise_reduction" in audio_input:
        settings = replace(settings, noise_reduction=_nullable_object(audio_input["noise_reduction"],
                                                                      f"{at}.noise_reduction"))
    return settings


def apply_beta(settings: Settings, session: Any, languages: frozenset[str]) -> Settings:
    """A beta `session` (transcription_session.update, POST /v1/realtime/transcription_sessions) over `settings`."""
    session = _object(session, "session")
    if "input_audio_format" in session:
        name = session["input_audio_format"]
        if name not in BETA_FORMATS:
            raise SettingsError("session.input_audio_format",
                                f"input_audio_format must be one of {', '.join(BETA_FORMATS)}, not {quoted(name)}")
        settings = _format(settings, {"type": BETA_FORMATS[name]}, "session.input_audio_format")
    if "input_audio_transcription" in session:
        settings = _transcription(settings, session["input_audio_transcription"],
                                  "session.input_audio_transcription", languages)
    if "turn_detection" in session:
        settings = _turns(settings, session["turn_detection"], "session.turn_detection")
    if "input_audio_noise_reduction" in session:
        settings = replace(settings, noise_reduction=_nullable_object(session["input_audio_noise_reduction"],
                                                                      "session.input_audio_noise_reduction"))
    if "include" in session:
        settings = replace(settings, logprobs=_logprobs(session["include"], "session.include"))
    return settings


def _object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError(param, f"{param} must be an object")
    return value


def _nullable_object(value: Any, param: str) -> dict[str, Any] | None:
    return None if value is None else _object(value, param)


def _logprobs(value: Any, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(param, f"{param} must be a list of strings")
    return LOGPROBS in value


def _format(settings: Settings, value: Any, param: str) -> Settings:
    value = _object(value, param)
    kind = value.get("type", "audio/pcm")
    if kind not in GA_FORMATS:
        raise SettingsError(f"{param}.type", f"format type must be one of {', '.join(GA_FORMATS)}, not {quoted(kind)}")
    if kind != "audio/pcm":
        return replace(settings, format=kind, rate=G711_RATE)
    rate = value.get("rate", PCM_RATE)
    # OpenAI takes 24 kHz only; any rate from 8 to 48 kHz is taken here.
    if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
        raise SettingsError(f"{param}.rate", f"rate must be an integer from {MIN_RATE} to {MAX_RATE} "
                            f"(OpenAI's is {PCM_RATE})")
    return replace(settings, format=kind, rate=rate)


def _text(value: Any, param: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SettingsError(param, f"{param} must be a string")
    return value


def _transcription(settings: Settings, value: Any, param: str, languages: frozenset[str]) -> Settings:
    value = _object(value, param)
    if "model" in value:
        settings = replace(settings, model=_text(value["model"], f"{param}.model") or None)
    if "prompt" in value:
        settings = replace(settings, prompt=_text(value["prompt"], f"{param}.prompt") or "")
    if "language" in value:
        settings = replace(settings, language=language(value["language"], f"{param}.language", languages))
    return settings


def language(value: Any, param: str, languages: frozenset[str]) -> str | None:
    """An ISO-639-1 code the model knows (a region, as in en-US, is dropped); None for the default."""
    code = _text(value, param)
    if not code:
        return None
    code = code.split("-")[0].split("_")[0].lower()
    if code not in languages:
        known = "English only" if languages == {"en"} else f"{len(languages)} languages"
        raise SettingsError(param, f"language {quoted(value)} is not supported by this server's model "
                            f"({known})", code="unsupported_language")
    return code


def _turns(settings: Settings, value: Any, param: str) -> Settings:
    if value is None:
        return replace(settings, turns=None)
    value = _object(value, param)
    kind = value.get("type", "server_vad")
    if kind not in TURN_TYPES:
        raise SettingsError(f"{param}.type", f"turn_detection type must be one of {', '.join(TURN_TYPES)}")
    base = settings.turns or Turns("server_vad", 0.5, 300, 500)
    threshold = _number(value, "threshold", base.threshold, param, 0.0, 1.0)
    prefix = _number(value, "prefix_padding_ms", base.prefix_padding_ms, param, 0, None)
    silence = _number(value, "silence_duration_ms", base.silence_duration_ms, param, 0, None)
    eagerness = value.get("eagerness", base.eagerness if kind == "semantic_vad" else None)
    return replace(settings, turns=Turns(
        kind, round(_clamp(threshold, *THRESHOLD), 3), int(_clamp(prefix, *PREFIX_MS)),
        int(_clamp(silence, *ENDPOINT_MS)), eagerness if kind == "semantic_vad" else None))


def _number(value: dict[str, Any], name: str, default: float, param: str, low: float, high: float | None) -> float:
    number = value.get(name, default)
    if number is None:
        return default
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number < low or (
            high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise SettingsError(f"{param}.{name}", f"{name} must be a number {bounds}")
    return number


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


# Reporting ----------------------------------------------------------------------------------------

def _turn_object(turns: Turns | None) -> dict[str, Any] | None:
    if turns is None:
        return None
    body: dict[str, Any] = {"type": turns.type, "threshold": turns.threshold,
                            "prefix_padding_ms": turns.prefix_padding_ms,
                            "silence_duration_ms": turns.silence_duration_ms}
    if turns.eagerness is not None:
        body["eagerness"] = turns.eagerness
    return body


def _format_object(settings: Settings) -> dict[str, Any]:
    return {"type": settings.format, "rate": settings.rate} if settings.format == "audio/pcm" else {
        "type": settings.format}


def ga_session(settings: Settings, session_id: str | None = None, expires_at: int | None = None) -> dict[str, Any]:
    """The GA session object, as session.created, session.updated and client_secrets report it."""
    body: dict[str, Any] = {"type": "transcription"}
    if session_id is not None:
        body.update(id=session_id, object="realtime.transcription_session", expires_at=expires_at or 0)
    body["audio"] = {"input": {
        "format": _format_object(settings),
        "noise_reduction": settings.noise_reduction,
        "transcription": {"model": settings.model or settings.served_model, "language": settings.language,
                          "prompt": settings.prompt},
        "turn_detection": _turn_object(settings.turns)}}
    body["include"] = [LOGPROBS] if settings.logprobs else None
    return body


def beta_session(settings: Settings, session_id: str, expires_at: int | None = None) -> dict[str, Any]:
    """The beta transcription session object."""
    formats = {ga: beta for beta, ga in BETA_FORMATS.items()}
    return {"id": session_id, "object": "realtime.transcription_session", "expires_at": expires_at or 0,
            "input_audio_format": formats[settings.format],
            "input_audio_transcription": {"model": settings.model or settings.served_model,
                                          "language": settings.language, "prompt": settings.prompt},
            "turn_detection": _turn_object(settings.turns),
            "input_audio_noise_reduction": settings.noise_reduction,
            "include": [LOGPROBS] if settings.logprobs else None, "modalities": ["text"]}
