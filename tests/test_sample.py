"""`nanogpt-jax sample` (nanogpt_jax.sample): continuations of the prompt decoded with the run's vocabulary, the
greedy one equal to generate's greedy output, and the prompt read from FILE:path."""

import jax
import numpy as np
import pytest

from nanogpt_jax.config import SampleConfig, UserError
from nanogpt_jax.generate import generate
from nanogpt_jax.load import load_run
from nanogpt_jax.sample import read_start, sample


def test_samples_continue_the_prompt_in_the_runs_vocabulary(char_run):
    """num_samples strings, each the prompt then max_new_tokens characters of the run's vocabulary; the seed
    decides them."""
    out, _ = char_run
    itos = load_run(str(out))[2].meta["itos"]
    cfg = SampleConfig(out_dir=str(out), start="ROMEO:", num_samples=3, max_new_tokens=12, seed=4)
    texts = sample(cfg)
    assert len(texts) == 3
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 12 and set(text) <= set(itos)
    assert sample(cfg) == texts


def test_greedy_sample_is_generates_greedy_output_decoded(char_run):
    """temperature=0: every row is generate's argmax continuation of the prompt, decoded by the vocabulary."""
    out, _ = char_run
    config, params, record = load_run(str(out))
    itos = record.meta["itos"]
    prompt = "KING:\n"
    ids = np.array([[itos.index(c) for c in prompt]] * 2, np.int32)
    expected = np.asarray(generate(config, params, ids, 20, key=jax.random.PRNGKey(0), temperature=0.0))
    texts = sample(SampleConfig(out_dir=str(out), start=prompt, num_samples=2, max_new_tokens=20,
                                temperature=0.0, seed=9))
    assert texts == ["".join(itos[i] for i in row) for row in expected.tolist()]


def test_read_start_reads_file_prompts(tmp_path):
    """FILE:path is the file's text (UTF-8, newlines kept); any other start is the prompt itself."""
    path = tmp_path / "prompt.txt"
    path.write_text("ROMEO:\nWhat, ho! Été\n", encoding="utf-8")
    assert read_start(f"FILE:{path}") == "ROMEO:\nWhat, ho! Été\n"
    assert read_start("ROMEO:") == "ROMEO:" and read_start("FILE") == "FILE"
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=f"--start=FILE:{missing}: cannot read {missing} \\(No such file"):
        read_start(f"FILE:{missing}")


def test_an_empty_prompt_is_refused(char_run, tmp_path):
    """There is nothing to continue from an empty --start (or an empty FILE:)."""
    out, _ = char_run
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    for start in ("", f"FILE:{tmp_path / 'empty.txt'}"):
        with pytest.raises(UserError, match="--start is empty"):
            sample(SampleConfig(out_dir=str(out), start=start))
