"""`nanogpt-jax sample`, nanoGPT's sample.py: continue a prompt with a checkpoint or released GPT-2 weights."""

import jax
import numpy as np

from .config import SampleConfig, UserError
from .tokenizers import Tokenizer
from .generate import generate
from .load import load_model


def read_start(start: str) -> str:
    """The prompt: the text itself, or the contents of FILE:path."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--start={start}: cannot read {start[5:]} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--start={start}: {start[5:]} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None


def sample(cfg: SampleConfig) -> list[str]:
    """num_samples continuations of the prompt, decoded, each beginning with the prompt."""
    config, params, meta, _ = load_model(cfg)
    tokenizer = Tokenizer(meta)
    ids = tokenizer.encode(read_start(cfg.start))
    if not ids:
        raise UserError("--start is empty: give at least one character or token to start from")
    vocab = min(tokenizer.vocab_size, config.vocab_size)
    if max(ids) >= vocab:  # such an id reads past the embedding table: NaN logits, not text
        raise UserError(f"--start encodes to token id {max(ids):,} and the model knows {vocab:,} ids: it was not "
                        "trained with this tokenizer; start with text made of its tokens")
    prompt = np.tile(np.asarray(ids, np.int32), (cfg.num_samples, 1))
    out = generate(config, params, prompt, cfg.max_new_tokens, key=jax.random.PRNGKey(cfg.seed),
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   vocab_size=vocab)
    return [tokenizer.decode(row.tolist()) for row in np.asarray(out)]
