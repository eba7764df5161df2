"""Every server setting, in one place: each is a command-line flag and an environment variable."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Sequence

ENV_PREFIX = "STT_"
_STORAGE_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?")  # as ops/storage/s3.py reads it


def _ice_servers(value: str) -> list[dict[str, Any]]:
    """A JSON list of RTCIceServer objects, or comma-separated URLs."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        servers = json.loads(value)
        if not isinstance(servers, list) or not all(isinstance(s, dict) and "urls" in s for s in servers):
            raise ValueError("ICE servers JSON must be a list of objects with 'urls'")
        return servers
    return [{"urls": url.strip()} for url in value.split(",") if url.strip()]


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _list(value: str) -> list[str]:
    """Comma-separated values."""
    return [item.strip() for item in value.split(",") if item.strip()]


class _Repeated(argparse.Action):
    """A list flag that may be given again to add values; the command line replaces the environment."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, values if current is self.default else current + values)


@dataclass(frozen=True)
class Config:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port for HTTP and signaling"})
    model: str = field(default="tiny.en", metadata={
        "help": "tiny.en (embedded), base (packaged multilingual), a CTranslate2 model folder, or a faster-whisper "
                "hub name (needs network once)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    compute_type: str = field(default="int8", metadata={"help": "CTranslate2 compute type"})
    decode_workers: int = field(default=os.cpu_count() or 1, metadata={
        "shown": "cores", "help": "Whisper decodes that run at once (default: the number of cores)"})
    cpu_threads: int = field(default=1, metadata={"help": "threads per Whisper decode"})
    decode_nice: int = field(default=0, metadata={
        "help": "niceness added to the Whisper compute threads (Linux), so that under load the event loop that takes "
                "in the audio comes first; every other process on the machine does too (0: the same priority; 0 to "
                "19; see [Architecture](architecture.md#architecture))"})
    beam_size: int = field(default=5, metadata={
        "help": "beam size for a final (partials, and finals while other finals wait for a decode worker, are "
                "greedy); 1: greedy for every final, sooner on a CPU too slow to decode a final within its endpoint "
                "and less accurate (see [Performance](performance.md#latency-on-a-slower-cpu))"})
    decode_window_s: float = field(default=30.0, metadata={
        "help": "seconds of encoder output the decoder attends over: the encoder runs over the utterance plus 1 to 3 "
                "s, the rest is a precomputed encoding of silence (Whisper's own: 30)"})
    busy_decode_window_s: float = field(default=10.0, metadata={
        "help": "the same for partials while other decodes run or wait, and for finals in a burst: cheaper, less "
                "accurate"})
    lift_dbfs: float = field(default=-40.0, metadata={
        "help": "speech quieter than this active level (dBFS) is brought up to it before Whisper hears it, which "
                "mishears very quiet speech (at most 40 dB, never to clipping); 0: never"})
    language: str = field(default="", metadata={
        "help": "default language code; empty: en for English-only models, detect otherwise"})
    endpoint_ms: int = field(default=600, metadata={"help": "silence that ends an utterance"})
    unfinished_endpoint_ms: int = field(default=1600, metadata={
        "help": "silence that ends an utterance whose early final stops mid-clause (on a comma or dash, or a word "
                "such as \"the\" or \"and\"), ends several words with no end mark, or is a word or two Whisper "
                "doubted with nothing heard before them; at least `--endpoint-ms`"})
    verdict_wait_ms: int = field(default=300, metadata={
        "help": "how much longer than `--endpoint-ms` a pause may run while its early final, which may call the "
                "words unfinished, is still being decoded, where the audio comes faster than real time (a stream "
                "in real time waits for that verdict up to `--unfinished-endpoint-ms`)"})
    context_chars: int = field(default=200, metadata={
        "help": "characters of a session's last finals that the next decode continues (Whisper's previous-text "
                "prompt), used when the last final stopped mid-clause and for a piece decoded as its continuation; "
                "0: never"})
    fragment_context_s: float = field(default=20.0, metadata={
        "help": "speech up to this long, begun within 2 s of the last final (4 s of one left open), is decoded "
                "as that final's continuation: after the last 3 s of its audio, those words forced first and the "
                "words before them as the prompt (0: alone)"})
    partial_interval_ms: int = field(default=600, metadata={
        "help": "new audio between two partial hypotheses; at least twice as long as the last one took to come back"})
    sentence_endpoint: float = field(default=0.8, metadata={
        "help": "share of the endpoint silence that ends an utterance whose early final already ends a sentence (. ? "
                "!); 1: off"})
    early_final_ms: int = field(default=160, metadata={
        "help": "pause after which the final is decoded ahead of the endpoint (0: off)"})
    vad_threshold: float = field(default=0.5, metadata={"help": "speech probability that starts speech"})
    vad_refresh_ms: int = field(default=512, metadata={
        "help": "non-speech after which Silero VAD's second state starts afresh, so that what it heard before (a "
                "louder speaker) does not mute what follows (0: one state, never refreshed)"})
    vad_lift_db: float = field(default=30.0, metadata={
        "help": "most gain a quiet stream gets before Silero VAD hears it: the loudest sound of the last second is "
                "brought up to -30 dBFS, never down, so that a quiet or distant speaker still starts utterances "
                "(Whisper does not hear this gain: its own is --lift-dbfs); 0: off"})
    min_speech_ms: int = field(default=250, metadata={
        "help": "shorter sounds do not start speech, but speech begun within the unfinished endpoint after one "
                "starts at it"})
    preroll_ms: int = field(default=300, metadata={"help": "audio kept from before speech onset"})
    max_utterance_s: float = field(default=20.0, metadata={"help": "longer speech is split (max 30)"})
    max_sessions: int = field(default=16, metadata={"help": "concurrent sessions; more get 503"})
    ice_timeout_s: float = field(default=15.0, metadata={"help": "time for ICE to connect"})
    opus_bitrate: int = field(default=96000, metadata={
        "help": "average bit rate (bit/s) the SDP answer asks of a peer's Opus encoder (`maxaveragebitrate`): "
                "browsers send 32000 unasked, which Whisper hears less well ([Accuracy](accuracy.md)); 6000 to "
                "510000, or 0: ask nothing"})
    idle_timeout_s: float = field(default=30.0, metadata={"help": "end a session with no audio for this long"})
    max_session_s: float = field(default=3600.0, metadata={"help": "longest session"})
    max_offer_bytes: int = field(default=65536, metadata={"help": "largest accepted SDP offer"})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "time for a request's head (request line and headers) to arrive, from the connection's "
                "opening, or from the first byte of a later request on a keep-alive connection; "
                "a slower connection gets 408 and is closed"})
    body_timeout_s: float = field(default=10.0, metadata={
        "help": "time for a request body the server reads (an SDP offer, a token request) to arrive once "
                "its head has; a slower one gets 408 and the connection is closed"})
    keepalive_timeout_s: float = field(default=130.0, metadata={
        "help": "idle time after which a keep-alive connection with no new request is closed; keep it above "
                "the idle timeout of a reverse proxy or load balancer in front"})
    max_pending_connections: int = field(default=512, metadata={
        "help": "HTTP connections open without a request in progress (new ones, idle keep-alive ones); "
                "past it, the oldest of them is closed. WebSocket and SSE streams are not counted"})
    ice_servers: list = field(default_factory=list, metadata={
        "help": "STUN/TURN servers: JSON list of RTCIceServer objects, or comma-separated URLs; empty by default (no "
                "public STUN server is ever contacted)",
        "parse": _ice_servers})
    api_key: list = field(default_factory=list, metadata={
        "help": "[API keys](operations.md#access-control) that open sessions and mint tokens: comma-separated, or the"
                " flag repeated; none (and no `--api-key-file`): access is open",
        "parse": _list, "repeat": True})
    api_key_file: str = field(default="", metadata={
        "help": "file of API keys, one per line (blank lines and `#` comments skipped)"})
    token_secret: str = field(default="", metadata={
        "shown": "(random)",
        "help": "secret that signs session tokens, at least 16 characters; empty: random at each start (replicas "
                "behind one load balancer need one shared secret)"})
    token_max_ttl_s: float = field(default=3600.0, metadata={"help": "longest lifetime of a session token"})
    allowed_origins: list = field(default_factory=list, metadata={
        "help": "browser origins allowed to use the API (CORS, WebSocket `Origin`), comma-separated, `*` for any; "
                "empty: the server's own origin only", "parse": _list})
    max_sessions_per_key: int = field(default=0, metadata={
        "help": "concurrent sessions per API key and the tokens it minted; more get 429 (0: no limit)"})
    replica_id: str = field(default="", metadata={
        "help": "1 to 8 hex digits that start every session id of this replica, so that a load balancer routes a "
                "session's DELETE and SSE to it ([Deployment](deployment.md#several-replicas-behind-a-load-balancer));"
                " give every replica one of the same length"})
    trusted_proxies: int = field(default=0, metadata={
        "help": "reverse proxies in front whose `X-Forwarded-For` names the client in logs (0: the peer address)"})
    max_upload_mb: float = field(default=25.0, metadata={
        "help": "largest [file](files.md) the transcription routes take, in MiB (a multipart form or a raw body); a "
                "larger one gets 413 before it is read"})
    max_file_s: float = field(default=3600.0, metadata={
        "help": "longest audio of a file, in seconds; a longer one gets 413 as soon as decoding passes it"})
    max_file_jobs: int = field(default=2, metadata={
        "help": "files transcribed at once; more get 429 with `Retry-After`. Files decode on the threads live "
                "sessions leave"})
    file_batch: int = field(default=4, metadata={
        "help": "utterances of a file decoded together in one batch; each file keeps two batches in flight"})
    upload_timeout_s: float = field(default=300.0, metadata={
        "help": "time for a file's body to arrive once its head has (instead of `--body-timeout-s`); a slower "
                "one gets 408"})
    fetch_url_hosts: list = field(default_factory=list, metadata={
        "help": "hosts whose http(s) URLs `POST /v1/listen` may fetch for a client (`{\"url\": ...}`), "
                "comma-separated; empty: every URL is refused and the server fetches nothing", "parse": _list})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="text", metadata={"help": "`text`, or `json`: one JSON object per line "
                                                                           "([Monitoring](operations.md#monitoring))"})
    certfile: str = field(default="", metadata={
        "help": "PEM certificate (chain) to serve HTTPS; phones open the microphone only over HTTPS"})
    keyfile: str = field(default="", metadata={
        "help": "PEM private key of `--certfile` (empty: the key is in the certificate file)"})
    self_signed: bool = field(default=False, metadata={
        "help": "serve HTTPS with a development certificate made for this machine (browsers warn: see [Phones and "
                "HTTPS](browser.md#phones-and-https))"})
    data_dir: str = field(default="./data", metadata={
        "help": "folder of [saved sessions](operations.md#saved-transcripts): transcripts as they happen, audio if "
                "recorded; empty: save nothing"})
    record_audio: bool = field(default=False, metadata={
        "help": "also save the audio each session received (16 kHz mono, Ogg/Opus) in its folder"})
    retention_days: float = field(default=0.0, metadata={
        "help": "delete saved sessions that ended longer ago than this, at startup and hourly (0: keep them)"})
    storage_url: str = field(default="", metadata={
        "help": "S3-compatible bucket for saved sessions, `s3://bucket/prefix`: each session is uploaded when "
                "it ends (written to `--data-dir` first, which it needs) and read back from there, so replicas "
                "sharing the bucket list the same sessions; `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, "
                "`AWS_SECRET_ACCESS_KEY` and `AWS_REGION` configure the client ([Deployment]"
                "(deployment.md#s3-compatible-storage)); empty: sessions stay in `--data-dir`"})

    def __post_init__(self) -> None:
        if not 0 < self.max_utterance_s <= 30:
            raise ValueError("max_utterance_s must be in (0, 30]: Whisper sees at most 30 s")
        if self.endpoint_ms < 100:
            raise ValueError("endpoint_ms must be at least 100")
        if min(self.context_chars, self.vad_refresh_ms, self.fragment_context_s, self.verdict_wait_ms) < 0:
            raise ValueError("context_chars, vad_refresh_ms, fragment_context_s and verdict_wait_ms must be 0 or more")
        if not (5 <= self.decode_window_s <= 30 and 5 <= self.busy_decode_window_s <= 30):
            raise ValueError("decode_window_s and busy_decode_window_s must be between 5 and 30")
        if not -80 <= self.lift_dbfs <= 0:
            raise ValueError("lift_dbfs must be between -80 and 0 (0: never)")
        if not 0 <= self.vad_lift_db <= 60:
            raise ValueError("vad_lift_db must be between 0 and 60 (0: off)")
        if self.decode_workers < 1 or self.cpu_threads < 1:
            raise ValueError("decode_workers and cpu_threads must be at least 1")
        if not 0 <= self.decode_nice <= 19:
            raise ValueError("decode_nice must be between 0 and 19")
        if not 0.2 <= self.sentence_endpoint <= 1:
            raise ValueError("sentence_endpoint must be between 0.2 and 1")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if self.opus_bitrate and not 6000 <= self.opus_bitrate <= 510000:
            raise ValueError("opus_bitrate must be between 6000 and 510000 (Opus's range), or 0")
        if min(self.header_timeout_s, self.body_timeout_s, self.keepalive_timeout_s) <= 0:
            raise ValueError("header_timeout_s, body_timeout_s and keepalive_timeout_s must be above 0")
        if self.max_pending_connections < 1:
            raise ValueError("max_pending_connections must be at least 1")
        if self.token_secret and len(self.token_secret) < 16:
            raise ValueError("token_secret must have at least 16 characters")
        if self.replica_id and not re.fullmatch(r"[0-9a-f]{1,8}", self.replica_id):
            raise ValueError("replica_id must be 1 to 8 lowercase hex digits")
        if self.token_max_ttl_s < 1:
            raise ValueError("token_max_ttl_s must be at least 1")
        if self.max_sessions_per_key < 0 or self.trusted_proxies < 0:
            raise ValueError("max_sessions_per_key and trusted_proxies must be 0 or more")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if self.keyfile and not self.certfile:
            raise ValueError("keyfile needs certfile")
        if self.self_signed and self.certfile:
            raise ValueError("self_signed and certfile exclude each other")
        if self.retention_days < 0:
            raise ValueError("retention_days must be 0 (keep) or more")
        if self.max_upload_mb <= 0 or self.max_file_s <= 0 or self.upload_timeout_s <= 0:
            raise ValueError("max_upload_mb, max_file_s and upload_timeout_s must be above 0")
        if self.max_file_jobs < 1 or self.file_batch < 1:
            raise ValueError("max_file_jobs and file_batch must be at least 1")
        if self.record_audio and not self.data_dir:
            raise ValueError("record_audio needs a data_dir")
        if self.storage_url:
            if not _STORAGE_URL.fullmatch(self.storage_url):
                raise ValueError("storage_url must be s3://bucket or s3://bucket/prefix (a bucket name is 3 to 63 "
                                 "lowercase letters, digits, dots and hyphens)")
            if not self.data_dir:
                raise ValueError("storage_url needs a data_dir: sessions are written there first, and "
                                 "uploaded when they end")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] = os.environ) -> "Config":
        parser = argparse.ArgumentParser(description="Live speech-to-text server (WebRTC + Whisper)")
        for f in fields(cls):
            env = ENV_PREFIX + f.name.upper()
            parse = f.metadata.get("parse") or _PARSERS[f.type]
            default = f.default_factory() if f.default is MISSING else f.default
            # argparse runs `type` on string defaults too, so an environment value is parsed alike.
            # A boolean flag alone means true (--self-signed); it also takes a value (--self-signed no).
            switch = {"nargs": "?", "const": True} if f.type == "bool" else {}
            if f.metadata.get("repeat"):  # --api-key a --api-key b
                switch = {"action": _Repeated}
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse,
                                default=environ.get(env, default),
                                help=f"{_plain(f.metadata['help'])} [env {env}]", **switch)
        ns = parser.parse_args(argv)
        try:
            return cls(**vars(ns))
        except ValueError as e:
            parser.error(str(e))


_PARSERS = {"str": str, "int": int, "float": float, "bool": _bool}
REFERENCE = Path(__file__).resolve().parent / "docs" / "configuration.md"
_TABLE = ("<!-- settings:start -->", "<!-- settings:end -->")


def _plain(markdown: str) -> str:
    """A help text as the command line shows it: without the page's links and code marks."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown).replace("`", "")


def _shown(f) -> str:
    if "shown" in f.metadata:
        return f.metadata["shown"]
    default = f.default_factory() if f.default is MISSING else f.default
    if default in ("", []):
        return "(empty)"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def reference_table() -> str:
    """The settings table of docs/configuration.md, made from Config so that the page cannot drift from it."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {_shown(f)} | "
                    f"{f.metadata['help']} |")
    return "\n".join([_TABLE[0], "", *rows, "", _TABLE[1]])


def write_reference() -> None:
    """`python config.py`: rewrites the table in docs/configuration.md after a setting changes."""
    text = REFERENCE.read_text()
    start, end = text.index(_TABLE[0]), text.index(_TABLE[1]) + len(_TABLE[1])
    REFERENCE.write_text(text[:start] + reference_table() + text[end:])


if __name__ == "__main__":
    write_reference()
