"""Fixtures of the deployment tests: the project's container image, built once per run."""

from __future__ import annotations

import pytest

from podman import IMAGE, build_image


@pytest.fixture(scope="session")
def image() -> str:
    seconds = build_image()
    print(f"\nimage {IMAGE} ready in {seconds:.0f} s")
    return IMAGE
