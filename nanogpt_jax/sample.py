"""`nanogpt-jax sample`, nanoGPT's sample.py: continue prompts with a checkpoint or released GPT-2 weights, all at
once or (`--stream`) printed as they are made."""

import dataclasses
from typing import Callable

import jax
import numpy as np

from . import parallel
from .config import ConfigError, SampleConfig, UserError
from .generate import generate, generate_stream
from .load import load_model
from .tokenizers import Tokenizer


def _read(start: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--start={start}: cannot read {path} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--start={start}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None


def read_start(start: str) -> list[str]:
    """The prompts: the text itself, the contents of FILE:path (nanoGPT's form: the whole file is one prompt),
    or each non-empty line of LINES:path (sampled together as one batch)."""
    if start.startswith("FILE:"):
        return [_read(start, start[5:])]
    if start.startswith("LINES:"):
        lines = [line for line in _read(start, start[6:]).splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--start={start}: {start[6:]} has no non-empty line; give one prompt per line")
        return lines
    return [start]


@dataclasses.dataclass
class Job:
    """A sample command's model, tokenizer and prompt ids, checked."""

    config: object
    params: object
    tokenizer: Tokenizer
    prompts: list[list[int]]  # each prompt num_samples times
    vocab: int
    eos_id: int | None  # --stop's token when it is one token: decoding ends once every row has made it

    def generate_options(self, cfg: SampleConfig) -> dict:
        return dict(key=jax.random.PRNGKey(cfg.seed), temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    vocab_size=self.vocab, eos_id=self.eos_id)

    def text(self, cfg: SampleConfig, prompt: list[int], new: list[int]) -> tuple[str, bool]:
        """The decoded prompt and continuation, cut before the first --stop in the continuation; and whether
        it was cut."""
        text = self.tokenizer.decode(prompt + new)
        at = text.find(cfg.stop, len(self.tokenizer.decode(prompt))) if cfg.stop else -1
        return (text, False) if at < 0 else (text[:at], True)


def weights_mesh(fsdp: int):
    """`fsdp` of this machine's devices, to hold the weights split as training's FSDP splits them: at rest each
    device holds 1/fsdp of them, and the scanned layer loop gathers one layer's at a time."""
    devices = jax.local_devices()
    if fsdp > len(devices):
        raise ConfigError(f"--fsdp={fsdp}: this machine has {len(devices)} device(s); use at most that many")
    return parallel.make_mesh(devices[:fsdp], fsdp)


def prepare(cfg: SampleConfig) -> Job:
    config, params, meta, _ = load_model(cfg)
    if cfg.fsdp > 1:
        params = jax.device_put(params, parallel.state_shardings(weights_mesh(cfg.fsdp), params))
    tokenizer = Tokenizer(meta)
    vocab = min(tokenizer.vocab_size, config.vocab_size)
    prompts = [tokenizer.encode(text) for text in read_start(cfg.start)]
    if not all(prompts):
        raise UserError("--start is empty: give at least one character or token to start from")
    top = max(max(ids) for ids in prompts)
    if top >= vocab:  # such an id reads past the embedding table: NaN logits, not text
        raise UserError(f"--start encodes to token id {top:,} and the model knows {vocab:,} ids: it was not "
                        "trained with this tokenizer; start with text made of its tokens")
    stop_ids = tokenizer.encode(cfg.stop) if cfg.stop else []
    eos_id = stop_ids[0] if len(stop_ids) == 1 and stop_ids[0] < vocab else None
    return Job(config, params, tokenizer, [ids for ids in prompts for _ in range(cfg.num_samples)], vocab, eos_id)


def sample(cfg: SampleConfig) -> list[str]:
    """num_samples continuations of each prompt (prompt by prompt), decoded, each beginning with its prompt."""
    job = prepare(cfg)
    rows = generate(job.config, job.params, [np.asarray(p, np.int32) for p in job.prompts], cfg.max_new_tokens,
                    **job.generate_options(cfg))
    return [job.text(cfg, p, row[len(p):].tolist())[0] for p, row in zip(job.prompts, rows)]


def stream(cfg: SampleConfig, write: Callable[[str], None]) -> None:
    """The one sample of one prompt, written as it is made (prompt first). Text is held back while it ends in
    an unfinished UTF-8 character or could be the start of --stop."""
    job = prepare(cfg)
    if len(job.prompts) != 1:
        raise UserError(f"--stream shows one sample and there are {len(job.prompts)} (prompts x --num_samples): "
                        "set --num_samples=1 with one prompt, or --stream=False")
    prompt, new, shown = job.prompts[0], [], 0
    hold = max(len(cfg.stop or "") - 1, 0)
    chunks = generate_stream(job.config, job.params, [np.asarray(prompt, np.int32)], cfg.max_new_tokens,
                             **job.generate_options(cfg))
    text, stopped = job.text(cfg, prompt, new)
    for chunk in chunks:
        new += chunk[0].tolist()
        text, stopped = job.text(cfg, prompt, new)
        if stopped:
            break
        ready = len(text.rstrip("\ufffd")) - hold
        if ready > shown:
            write(text[shown:ready])
            shown = ready
    write(text[shown:])
