"""Shared fixtures: the read-only Tiny Shakespeare copy and tiktoken cache in `<repo>/../shared`, and datasets
prepared from it once per session into temporary folders (nothing is downloaded)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
INPUT_TXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
TIKTOKEN_CACHE = SHARED / "data" / "tiktoken_cache"

# Set before anything imports tiktoken, and inherited by the CLI subprocesses.
os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: the tests need the shared folder <repo>/../shared "
                    f"(Tiny Shakespeare input.txt and the tiktoken gpt2 cache); nothing is downloaded",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def input_txt() -> Path:
    """The shared Tiny Shakespeare input.txt (the file nanoGPT downloads)."""
    return _require(INPUT_TXT, "Tiny Shakespeare input.txt")


@pytest.fixture(scope="session")
def input_text(input_txt) -> str:
    return input_txt.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiktoken_cache() -> Path:
    return _require(TIKTOKEN_CACHE, "tiktoken cache")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, input_txt):
    """shakespeare_char prepared once: (data_dir, info returned by prepare)."""
    from nanogpt_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("data_char")
    info = prepare("shakespeare_char", data_dir=str(data_dir), input_path=str(input_txt))
    return data_dir, info


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory, input_txt, tiktoken_cache):
    """shakespeare (GPT-2 BPE) prepared once: (data_dir, info returned by prepare)."""
    from nanogpt_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("data_bpe")
    info = prepare("shakespeare", data_dir=str(data_dir), input_path=str(input_txt))
    return data_dir, info
