"""Shared fixtures: the real tokenizer files from ../shared (when present) and tiny generated models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    from hypothesis import settings
except ImportError:  # the GPU machine runs tests/gpu without it
    settings = None

if settings is not None:
    # CI must not fail on a new random example one commit and pass the next: examples are fixed by default.
    # HYPOTHESIS_PROFILE=explore searches with fresh random examples.
    settings.register_profile("ci", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # so tests can `import oracle`

REPO = TESTS.parent
FIXTURES = REPO.parent / "shared" / "fixtures"
REAL_TOKENIZER = FIXTURES / "phi3v-tokenizer"
PUBLISHED = FIXTURES / "phi-3.5-vision-instruct"


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not (REAL_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("../shared/fixtures/phi3v-tokenizer is not present")
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def published_dir() -> Path:
    if not (PUBLISHED / "config.json").is_file():
        pytest.skip("../shared/fixtures/phi-3.5-vision-instruct is not present")
    return PUBLISHED


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from phi3v_tune.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    from phi3v_tune import Phi3VProcessor

    return Phi3VProcessor.from_tokenizer(tiny_tokenizer, num_crops=4)


@pytest.fixture
def built_optimizers(monkeypatch) -> list:
    """(optimizer, model) for every optimizer our Trainer builds while the test runs (a spy on create_optimizer)."""
    from phi3v_tune.train.trainer import Phi3VTrainer

    seen: list = []
    original = Phi3VTrainer.create_optimizer

    def spy(self, model=None):
        seen.append((original(self, model), self.model))
        return seen[-1][0]

    monkeypatch.setattr(Phi3VTrainer, "create_optimizer", spy)
    return seen
