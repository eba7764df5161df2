"""The documentation's promises that code can check: every setting documented, the two commands there."""

import re
from dataclasses import fields
from pathlib import Path

from config import ENV_PREFIX, Config, reference_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    for f in fields(Config):
        flag, env = "--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper()
        assert f"| `{flag}` | `{env}` |" in CONFIGURATION, flag


def test_the_configuration_table_is_the_one_config_makes():
    assert reference_table() in CONFIGURATION, "docs/configuration.md is stale: run `python config.py`"


def test_readme_gives_the_two_commands_and_stays_short():
    assert "make serve" in README and "make test" in README
    assert len(README.splitlines()) <= 250


def test_environment_and_flags_configure_the_server():
    config = Config.from_args(["--endpoint-ms", "700"], {"STT_ENDPOINT_MS": "900", "STT_PORT": "9001"})
    assert config.endpoint_ms == 700 and config.port == 9001
    assert Config.from_args([], {"STT_ICE_SERVERS": "stun:a.example:3478"}).ice_servers == [
        {"urls": "stun:a.example:3478"}]
    assert Config.from_args([], {}).ice_servers == []  # never a public STUN server by default


def test_every_relative_link_in_the_docs_leads_to_a_file():
    """Links are relative to the page: a page in docs/ reaches bench/ as ../bench/."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
