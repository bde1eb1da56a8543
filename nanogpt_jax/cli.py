"""The `nanogpt-jax` command: prepare, train, sample, eval, convert, bench. Each is a thin shell over the package."""

import sys

USAGE = """usage: nanogpt-jax COMMAND [CONFIG.py ...] [--key=value ...]

commands:
  prepare DATASET [--input=PATH] [--data_dir=DIR]   tokenize Tiny Shakespeare (shakespeare_char | shakespeare)
  train [CONFIG.py] [--key=value ...]               train (nanoGPT's train.py options)
  sample [--out_dir=DIR] [--start=TEXT|FILE:path] ...   sample from a checkpoint (nanoGPT's sample.py options)
  eval [CONFIG.py] [--init_from=resume|gpt2|HF_DIR] [--split=val|train | --input=FILE] [--eval_iters=0] ...
                                                    loss and perplexity of a checkpoint or GPT-2 on a dataset
                                                    split or a text file (--eval_iters=0: every token once)
  convert --init_from=gpt2|HF_DIR --out_dir=DIR     HuggingFace GPT-2 -> checkpoint (train, sample, eval it)
  convert [--out_dir=DIR] --hf_dir=HF_DIR           checkpoint -> HuggingFace folder (GPT2LMHeadModel)
  bench [--key=value ...]                           measure training step and generate speed
"""


def prepare(argv):
    from .config import ConfigError
    from .data import prepare as prepare_dataset

    if not argv or argv[0].startswith("--"):
        raise ConfigError("prepare needs a dataset: nanogpt-jax prepare shakespeare_char (or shakespeare)")
    opts = {"input": None, "data_dir": "data"}
    for arg in argv[1:]:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in opts:
            raise ConfigError(f"prepare: unknown argument {arg!r}; it takes --input=PATH and --data_dir=DIR")
        opts[key] = value
    info = prepare_dataset(argv[0], data_dir=opts["data_dir"], input_path=opts["input"])
    print(f"wrote {info['dir']}: vocab size {info['vocab_size']:,}, "
          f"train {info['train_tokens']:,} tokens, val {info['val_tokens']:,} tokens")


def options(cls, argv):
    """Parse CONFIG.py files and --key=value into `cls`; nanoGPT options with no meaning here get a note."""
    from .config import parse

    notes = []
    cfg = parse(cls, argv, notes)
    for note in notes:
        print(note, file=sys.stderr)
    return cfg


def train(argv):
    from .config import TrainConfig
    from .train import train as run_training

    run_training(options(TrainConfig, argv))


def sample(argv):
    import jax
    import numpy as np

    from .checkpoint import load_model
    from .config import SampleConfig, UserError
    from .data import Tokenizer
    from .generate import generate

    cfg = options(SampleConfig, argv)
    config, params, meta, _ = load_model(cfg.init_from, cfg.out_dir, cfg.checkpoint, cfg.dtype)
    tokenizer = Tokenizer(meta)
    start = cfg.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"--start={cfg.start}: cannot read {start[5:]} ({e.strerror})") from None
    ids = tokenizer.encode(start)
    if not ids:
        raise UserError("--start is empty: give at least one character or token to start from")
    prompt = np.tile(np.asarray(ids, np.int32), (cfg.num_samples, 1))
    out = generate(config, params, prompt, cfg.max_new_tokens, key=jax.random.PRNGKey(cfg.seed),
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   vocab_size=min(tokenizer.vocab_size, config.vocab_size))
    for row in np.asarray(out):
        print(tokenizer.decode(row.tolist()))
        print("---------------")


def evaluate(argv):
    from .config import EvalConfig
    from .evaluate import run

    r = run(options(EvalConfig, argv))
    print(f"{r.source}: loss {r.loss:.4f}, perplexity {r.perplexity:.2f} ({r.tokens:,} tokens, {r.batches:,} batches)")


def convert(argv):
    from .config import ConvertConfig
    from .convert import convert as run_convert

    print(run_convert(options(ConvertConfig, argv)))


def bench(argv):
    from .bench import main as run_bench

    run_bench(argv)


COMMANDS = {"prepare": prepare, "train": train, "sample": sample, "eval": evaluate, "convert": convert,
            "bench": bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .config import UserError
    from .parallel import use_all_cpu_cores

    use_all_cpu_cores()
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
