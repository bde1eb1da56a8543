"""The benchmark's options (BenchConfig: a training config plus what to time and how) and its shape presets."""

import dataclasses

import jax

from nanogpt_jax.config import ConfigError, TrainConfig, options_set


@dataclasses.dataclass
class BenchConfig(TrainConfig):
    bench: str = "train"  # 'train' or 'generate'
    shape: str | None = None  # a preset (TRAIN_SHAPES / DECODE_SHAPES): baby, char, gpt2, gpt2-xl; options given win
    compare: str | None = None  # 'torch': the same shape in transformers + torch, alternating with ours
    torch_compile: bool = False  # --compare=torch: also time the reference under torch.compile (always on a GPU)
    rounds: int = 3  # timed rounds; with --compare each round times ours, then theirs
    side: str = "both"  # 'ours', 'torch' or 'torch.compile': one side only (a fresh process per side measures its memory)
    steps: int = 10  # timed training steps per round (after one compiling step)
    vocab_size: int = 65  # synthetic data's vocabulary (65 = Tiny Shakespeare characters)
    new_tokens: int = 500  # generate: tokens sampled per row
    num_samples: int = 1  # generate: batch rows
    prompt_tokens: int = 1  # generate: prompt length per row
    temperature: float = 0.8  # generate: 0 = greedy (top_k 200 otherwise)
    repeats: int = 3  # generate: timed calls per round

    def __post_init__(self):
        super().__post_init__()
        for low, keys in ((1, ("steps", "vocab_size", "num_samples", "repeats", "rounds", "prompt_tokens")),
                          (0, ("new_tokens", "temperature"))):
            for key in keys:
                if getattr(self, key) < low:
                    raise ConfigError(f"--{key}={getattr(self, key)}: must be at least {low}")
        if self.bench not in ("train", "generate"):
            raise ConfigError(f"--bench={self.bench}: use train or generate")
        if self.compare not in (None, "torch"):
            raise ConfigError(f"--compare={self.compare}: use torch (or leave it out)")
        if self.side not in ("both", "ours", "torch", "torch.compile"):
            raise ConfigError(f"--side={self.side}: use both, ours, torch or torch.compile")


# Presets for --shape (options given on the command line or in a config file win). Train shapes: nanoGPT's
# CPU recipe (configs/shakespeare_char_cpu.py), its char recipe (configs/shakespeare_char.py), GPT-2 124M
# and 1.5B as nanoGPT trains them from scratch (no biases, vocabulary 50304). Per backend: rows per pass.
TRAIN_SHAPES = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
                 dropout=0.0, bias=False, vocab_size=65, learning_rate=1e-3, beta2=0.99),
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, gradient_accumulation_steps=1,
                 dropout=0.2, bias=False, vocab_size=65, learning_rate=1e-3, beta2=0.99),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, gradient_accumulation_steps=1,
                 dropout=0.0, bias=False, vocab_size=50304),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, gradient_accumulation_steps=1,
                    dropout=0.0, bias=False, vocab_size=50304),
}
TRAIN_ROWS = {  # backend -> shape -> (batch_size, micro_batch_size); a CPU's caches like small micro-batches
    "cpu": {"char": (64, 8), "gpt2": (2, 0)},
    "gpu": {"gpt2": (32, 0), "gpt2-xl": (8, 2)},
}
# Decoding: GPT-2 as released (biases, vocabulary 50257), random weights, prompt 32 + 128 greedy tokens.
DECODE_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257,
                 prompt_tokens=32, new_tokens=128, temperature=0.0),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, bias=True, vocab_size=50257,
                    prompt_tokens=32, new_tokens=128, temperature=0.0),
}
GPU_ONLY = {"gpt2-xl"}


def backend() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def shaped(cfg: BenchConfig) -> BenchConfig:
    """cfg with its --shape preset filled in under the options the user set."""
    if cfg.shape is None:
        return cfg
    table = DECODE_SHAPES if cfg.bench == "generate" else TRAIN_SHAPES
    if cfg.shape not in table:
        raise ConfigError(f"--shape={cfg.shape} for --bench={cfg.bench}: use one of {', '.join(table)}")
    if cfg.shape in GPU_ONLY and backend() == "cpu":
        raise ConfigError(f"--shape={cfg.shape} is for a GPU (this is a CPU)")
    preset = dict(table[cfg.shape])
    if cfg.bench == "train" and cfg.shape in TRAIN_ROWS[backend()]:
        preset["batch_size"], preset["micro_batch_size"] = TRAIN_ROWS[backend()][cfg.shape]
    user = options_set(cfg)
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in user})
