"""Shared test configuration: offline HuggingFace, fixtures from tests/fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.browser", "tests.fixtures.fairseq_models", "tests.fixtures.hf_models",
                  "tests.fixtures.planted", "tests.fixtures.real_models"]
