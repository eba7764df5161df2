"""protocol.py is the one definition of the wire protocol: docs/protocol.md says what it says, the server's
modules build events and use error codes only through it, and asr/ stays free of the server. No server runs."""

from __future__ import annotations

import ast
import base64
import gc
import re
from pathlib import Path

import pytest

import protocol
from protocol import ERRORS, ClientError

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "protocol.md").read_text()
# The server's own modules: what tests, the benchmark and the virtualenv hold is not the server, and
# adapters/ speak their vendors' protocols, not this one.
SERVER = sorted([*ROOT.glob("*.py"), *ROOT.glob("asr/*.py"), *ROOT.glob("rtc/*.py"), *ROOT.glob("ops/**/*.py")])
EVENT_BUILDERS = {ROOT / "protocol.py", ROOT / "asr" / "events.py"}


def _table(header: str) -> list[list[str]]:
    """The rows of the docs' table under this header line, split into cells."""
    lines = DOCS.splitlines()
    start = lines.index(header) + 2  # past the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([a-z][a-z0-9_]*)`", cell)


def _examples() -> dict[str, str]:
    """Each event's example in the docs' event list, by type: the JSON text, continuation lines joined."""
    block = DOCS.split("### Events", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    examples: dict[str, str] = {}
    for line in block.strip().splitlines():
        kind = re.match(r'\{"type": "([a-z.]+)"', line)
        if kind:
            examples[kind.group(1)] = line
        else:
            examples[list(examples)[-1]] += line
    return examples


def test_every_event_is_documented_with_its_fields():
    examples = _examples()
    word_fields = set(protocol.Word.__annotations__)
    for event in protocol.EVENTS:
        kind, fields = protocol.event_type(event), set(event.__annotations__)
        assert kind in examples, f"docs/protocol.md has no example of {kind}"
        shown = set(re.findall(r'"([a-z_]+)":', examples[kind]))
        assert fields <= shown and shown - fields <= word_fields, (kind, sorted(fields ^ shown))
    assert set(examples) == {protocol.event_type(e) for e in protocol.EVENTS}


def test_every_error_code_and_end_reason_is_documented():
    for code in ERRORS:
        assert f"`{code}`" in DOCS, f"docs/protocol.md does not name the error code {code}"
    reasons = DOCS.split("`session.ended` reasons:", 1)[1].split("\n- ", 1)[0]
    assert set(_codes(reasons)) == set(protocol.END_REASONS)


def test_the_http_error_table_agrees_with_the_protocol():
    rows = _table("| status | code | when |")
    assert rows
    for status, cell, _ in rows:
        for code in _codes(cell):
            assert code in ERRORS, f"docs/protocol.md names {code}, which protocol.py does not know"
            if status.isdigit():
                assert int(status) in ERRORS[code].http, (code, status, ERRORS[code].http)


def test_the_websocket_error_table_agrees_with_the_protocol():
    rows = _table("| bad input | code | answer |")
    assert rows
    for _, cell, answer in rows:
        codes = _codes(cell)
        assert codes and all(c in ERRORS for c in codes), codes
        closes = {int(c) for c in re.findall(r"close (\d{4})", answer)}
        if closes:
            assert {ERRORS[c].close for c in codes} == closes, (codes, answer)
        if "the session goes on" in answer:
            assert all(ERRORS[c].event and ERRORS[c].close is None for c in codes), codes


def _server_trees() -> list[tuple[Path, ast.AST]]:
    # No garbage collection while parsing: a finalizer that runs Python code in the middle (an earlier
    # test's asyncio task logging its exception) makes CPython 3.11.7's AST validator miscount its depth
    # and raise SystemError.
    gc.collect()
    gc.disable()
    try:
        return [(path, ast.parse(path.read_text(), str(path))) for path in SERVER]
    finally:
        gc.enable()


def test_only_the_protocol_builds_events():
    """An event is a dict with a "type": built anywhere else, a new field or a new event would be two edits."""
    for path in SERVER:
        if path in EVENT_BUILDERS:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"""["']type["']\s*:""", line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"


# Functions whose first argument is an error code (metrics.error's second, after its source).
_CODE_CALLS = {"ClientError", "error", "_unauthorized", "refused"}
_CODE = re.compile(r"[a-z][a-z0-9_]*$")


def _is_code(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(_CODE.match(node.value))


def _used_codes() -> set[tuple[int | None, str]]:
    """(HTTP status or None, code) wherever the server writes a code beside its status, or passes one to a
    function that takes a code first."""
    used: set[tuple[int | None, str]] = set()

    def pairs(values: list[ast.AST]) -> None:
        for a, b in zip(values, values[1:]):
            if isinstance(a, ast.Constant) and type(a.value) is int and 400 <= a.value < 600 and _is_code(b):
                used.add((a.value, b.value))

    for _, tree in _server_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                pairs(node.args)
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if owner in ("log", "logging"):
                    continue
                args = node.args
                if args and isinstance(args[0], ast.Constant) and args[0].value in ("http", "event"):
                    args = args[1:]  # metrics.error(source, code)
                if name in _CODE_CALLS and args and _is_code(args[0]):
                    used.add((None, args[0].value))
            elif isinstance(node, ast.Tuple):
                pairs(node.elts)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if key is not None:
                        pairs([key, value])
    return used


def test_every_error_code_the_server_uses_is_in_the_protocol():
    used = _used_codes()
    assert (400, "bad_sdp") in used and (None, "invalid_token") in used  # the scan sees the usual forms
    for status, code in sorted(used, key=str):
        assert code in ERRORS, f"{code} is used but protocol.ERRORS does not define it"
        assert status is None or status in ERRORS[code].http, (code, status, ERRORS[code].http)


def _outcomes(node: ast.AST) -> list[str]:
    """The strings an expression can be: a constant, or either side of `a if test else b`."""
    if isinstance(node, ast.IfExp):
        return _outcomes(node.body) + _outcomes(node.orelse)
    return [node.value] if _is_code(node) else []


def test_every_end_reason_the_server_uses_is_in_the_protocol():
    """The reasons passed to a session's end, or set as `reason`: each is one END_REASONS knows."""
    used = set()
    for _, tree in _server_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("end", "end_soon", "_end",
                                                                                   "close_all"):
                values = node.args
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "reason" for t in node.targets):
                values = [node.value]
            else:
                continue
            used |= {s for v in values for s in _outcomes(v)}
    assert {"stop", "idle_timeout", "not_reading", "shutdown"} <= used  # the scan sees the usual forms
    assert used <= set(protocol.END_REASONS), used - set(protocol.END_REASONS)


# The client messages, parsed without a server.

def _refused(parse, data) -> tuple[str, int | None]:
    with pytest.raises(ClientError) as e:
        parse(data)
    return e.value.code, e.value.close


def test_websocket_dialects():
    pcm = b"\x01\x00\xff\xff"
    assert protocol.ws_message(pcm) == protocol.Audio(pcm)
    for field in ("data", "payload"):
        text = '{"type": "audio", "%s": "%s"}' % (field, base64.b64encode(pcm).decode())
        assert protocol.ws_message(text) == protocol.Audio(pcm)
    assert protocol.ws_message('{"type": "stop"}') == protocol.Stop()
    assert protocol.ws_message('{"type": "control", "action": "stop"}') == protocol.Stop()
    assert protocol.ws_start('{"type": "start", "sample_rate": 8000, "partials": false}') == \
        protocol.Start("pcm_s16le", 8000, {"partials": False})
    assert protocol.ws_start(pcm) is None and protocol.ws_start('{"type": "stop"}') is None


def test_websocket_mistakes_and_how_the_session_goes_on():
    assert _refused(protocol.ws_message, "{") == ("bad_message", None)
    assert _refused(protocol.ws_message, '{"type": "audio", "data": "%%"}') == ("bad_base64", None)
    assert _refused(protocol.ws_message, '{"type": "start"}') == ("already_started", None)
    assert _refused(protocol.ws_message, '{"type": "control", "action": "go"}') == ("unknown_message", None)
    assert _refused(protocol.ws_message, bytes(protocol.MAX_AUDIO_BYTES + 1)) == ("too_large", 1008)
    assert _refused(protocol.ws_start, '{"type": "start", "sample_rate": 7999}') == ("unsupported_rate", 1003)
    assert _refused(protocol.ws_start, '{"type": "start", "encoding": "mp3"}') == ("unsupported_encoding", 1003)
    assert _refused(protocol.ws_start, '{"type": "start", "colour": "red"}') == ("unknown_option", 1008)


def test_data_channel_and_json_offer():
    assert protocol.channel_message(b'{"type": "stop"}') == protocol.Stop()
    assert _refused(protocol.channel_message, b"\xff") == ("bad_message", None)
    assert _refused(protocol.channel_message, '{"type": "audio"}') == ("unknown_message", None)
    assert protocol.rtc_offer(b'{"type": "offer", "sdp": "v=0", "language": "en"}') == ("v=0", {"language": "en"})
    assert _refused(protocol.rtc_offer, b"{")[0] == "bad_json"
    assert _refused(protocol.rtc_offer, b'{"type": "answer"}')[0] == "bad_offer"


def test_events_are_compact_json_dicts():
    event = protocol.session_ended("stop")
    assert event == {"type": "session.ended", "reason": "stop"}
    assert protocol.encode(event) == '{"type":"session.ended","reason":"stop"}'
