"""Greedy decoding of weights loaded with from_pretrained equals transformers' GPT2LMHeadModel.generate token for
token, at the widths and head counts of the four GPT-2 sizes (2 layers, vocab 512, randomly initialised here;
nothing is downloaded). This checks the KV-cached decode path on real checkpoint layouts, not just one forward."""

import jax
import numpy as np
import pytest
import torch

from conftest import HF_VOCAB as VOCAB, hf_gpt2
from nanogpt_jax import generate
from nanogpt_jax.pretrained import from_pretrained

PROMPT, NEW = 8, 32
SIZES = [(768, 12), (1024, 16), (1280, 20), (1600, 25)]  # (n_embd, n_head) of gpt2, -medium, -large, -xl


@pytest.mark.parametrize("n_embd, n_head", [SIZES[0]] + [pytest.param(*s, marks=pytest.mark.slow) for s in SIZES[1:]],
                         ids=lambda v: str(v))
def test_greedy_generate_matches_transformers(n_embd, n_head, tmp_path):
    """32 greedy tokens from the KV-cached decode equal transformers' generate, token for token."""
    # initializer_range 0.1 (not 0.02): logits spread enough that greedy continuations vary instead of repeating
    model = hf_gpt2(n_embd, n_head, initializer_range=0.1)
    model.save_pretrained(tmp_path)

    prompt = np.random.default_rng(n_embd).integers(0, VOCAB, (2, PROMPT))
    ids = torch.from_numpy(prompt)
    # No end-of-sequence stop (it would pad the rest), an explicit pad id and mask (else HF warns).
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                  pad_token_id=0).numpy()

    config, params = from_pretrained(tmp_path)
    got = np.asarray(generate(config, params, prompt.astype(np.int32), NEW, key=jax.random.key(0),
                              temperature=0.0))
    assert expected.shape == got.shape == (2, PROMPT + NEW)
    assert len(set(expected[:, PROMPT:].ravel())) > 8  # a varied continuation, not one token repeated
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_left_padded_prompts_match_transformers_with_attention_mask(tmp_path):
    """Prompts of 3, 7, 12 and 20 tokens, left padded into one batch: greedy, each row equals transformers'
    generate with attention_mask (its positions count from each row's first real token too) and our own
    generate of that row alone."""
    model = hf_gpt2(768, 12, initializer_range=0.1)
    model.save_pretrained(tmp_path)
    model.generation_config.eos_token_id = None
    lengths, width = [3, 7, 12, 20], 20
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, VOCAB, n) for n in lengths]
    padded = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
    mask = (np.arange(width)[None] >= width - np.asarray(lengths)[:, None]).astype(np.int64)
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(padded), attention_mask=torch.from_numpy(mask), do_sample=False,
                                  max_new_tokens=NEW, pad_token_id=0).numpy()[:, width:]

    config, params = from_pretrained(tmp_path)
    got = np.asarray(generate(config, params, padded.astype(np.int32), NEW, key=jax.random.key(0), temperature=0.0,
                              prompt_lengths=lengths))[:, width:]
    assert len({tuple(r) for r in expected}) == 4 and len(set(expected.ravel())) > 8
    np.testing.assert_array_equal(got, expected)
    for p, row in zip(prompts, got):
        alone = generate(config, params, p[None].astype(np.int32), NEW, key=jax.random.key(0), temperature=0.0)
        np.testing.assert_array_equal(np.asarray(alone)[0, len(p):], row)
