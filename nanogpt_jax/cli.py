"""The `nanogpt-jax` command: parse the options, call the package, print the result, word errors as one line."""

import json
import os
import sys
from pathlib import Path

import jax

from . import compile_check, convert, corpora, data, evaluate, helptext, parallel, peers, plot, sample, textdata, train
from .checkpoint import quiet_orbax_failures
from .config import (CompileConfig, ConfigError, ConvertConfig, EvalConfig, PrepareConfig, SampleConfig, TrainConfig,
                     UserError, parse, user_cache)
from .control import RunLock

USAGE = """usage: nanogpt-jax COMMAND [CONFIG.py ...] [--key=value | --key value ...]

commands:
  prepare DATASET [--input=PATH] [--data_dir=DIR]   tokenize Tiny Shakespeare (shakespeare_char | shakespeare;
                                                    the text ships with the package, --input overrides it)
  prepare text --input=PATH [--input=PATH ...] --name=NAME [--tokenizer=char|word|gpt2|sentencepiece]
               [--vocab_size=8192] [--val_fraction=0.1] [--data_dir=DIR]
                                                    tokenize your own text files (files, folders, globs) into
                                                    DIR/NAME; train it with --dataset=NAME
  prepare openwebtext [--input=LOCAL_COPY]          nanoGPT's OpenWebText: train.bin / val.bin (GPT-2 BPE)
  prepare fineweb_edu [--input=LOCAL_COPY] [--shard_size=100000000]
                                                    llm.c's FineWeb-Edu sample-10BT shards (pip install
                                                    'nanogpt-jax[hub]' for both)
  train [CONFIG.py] [--key=value ...]               train (nanoGPT's train.py options)
  sample [--out_dir=DIR] [--start=TEXT|FILE:path|LINES:path] [--stop=TEXT] [--stream] ...
                                                    sample from a checkpoint (nanoGPT's sample.py options);
                                                    LINES: one prompt per line, batched; --stream prints text
                                                    as it is made (the default for one sample on a terminal)
  eval [CONFIG.py] [--init_from=resume|gpt2|HF_DIR] [--split=val|train | --input=FILE] [--eval_iters=0] ...
                                                    loss, perplexity, bits/char of a checkpoint or GPT-2 on a dataset
                                                    split or a text file (--eval_iters=0: every token once)
  eval --task=hellaswag [--init_from=...] [--hellaswag_file=PATH]
                                                    HellaSwag acc / acc_norm (build-nanogpt's scoring; the val set
                                                    is downloaded once into ~/.cache/nanogpt-jax/hellaswag)
  convert --init_from=gpt2|HF_DIR --out_dir=DIR     HuggingFace GPT-2 -> checkpoint (train, sample, eval it)
  convert [--out_dir=DIR] --hf_dir=HF_DIR           checkpoint -> HuggingFace folder (GPT2LMHeadModel)
  compile [CONFIG.py] [--topology=v5e:2x4] [--what=train|generate] [--json] [--key=value ...]
                                                    compile what train (or generate) would run, for this machine's
                                                    devices or a TPU topology (pip install 'nanogpt-jax[tpu]'), and
                                                    print each device's memory and FLOPs; exit 3 if it does not fit
  plot OUT_DIR [OUT_DIR ...] [--output=loss.png]    loss, lr and tokens/s of runs (pip install 'nanogpt-jax[plot]')

--debug (or NANOGPT_JAX_DEBUG=1) shows the traceback behind an `error: ...` line.
train, sample and eval keep compiled programs in ~/.cache/nanogpt-jax/xla (under $XDG_CACHE_HOME when set), so a
second run does not compile them again; --no_compile_cache or NANOGPT_JAX_COMPILE_CACHE=0 turns that off, and
NANOGPT_JAX_COMPILE_CACHE=DIR puts it elsewhere.
"""
HELP = {"-h", "--help"}
CACHED = ("train", "sample", "eval")  # compile reports compile times: it always compiles


def use_compile_cache(argv) -> None:
    """JAX's persistent compilation cache, on unless the user turned it off (see USAGE)."""
    setting = os.environ.get("NANOGPT_JAX_COMPILE_CACHE", "")
    if "--no_compile_cache" in argv:
        argv.remove("--no_compile_cache")
        return
    if setting == "0" or argv[0] not in CACHED:
        return
    jax.config.update("jax_compilation_cache_dir", setting if setting not in ("", "1") else str(user_cache("xla")))


def options(cls, argv, positional=None):
    """Parse CONFIG.py files and options into `cls`; nanoGPT options with no meaning here get a note."""
    notes = []
    cfg = parse(cls, argv, notes, positional)
    for note in notes:
        print(note, file=sys.stderr)
    return cfg


def run_prepare(argv):
    cfg = options(PrepareConfig, argv, positional="dataset")
    if not cfg.dataset:
        raise ConfigError("prepare needs a dataset: nanogpt-jax prepare shakespeare_char (or shakespeare, or text)")
    known = (*data.DATASETS, *corpora.CORPORA, "text")
    if cfg.dataset not in known:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: prepare knows {', '.join(known)}")
    if os.path.isfile(cfg.data_dir):
        raise ConfigError(f"--data_dir={cfg.data_dir} is a file: give a folder to write {cfg.dataset}/ in")
    folder = textdata.dataset_dir(cfg.data_dir, cfg.name) if cfg.dataset == "text" else Path(cfg.data_dir) / cfg.dataset
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: prepare writes a folder there; move it or use another --data_dir")
    lock = RunLock(folder, "prepare", "prepare into another --name or --data_dir", cfg.force_unlock)
    try:
        _prepare(cfg)
    finally:
        lock.release()


def _prepare(cfg):
    if cfg.dataset == "text":
        info = textdata.prepare_text(cfg.input, cfg.name, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                     val_fraction=cfg.val_fraction, data_dir=cfg.data_dir)
        # a file named twice, or reached again through a link, is read once
        skipped = f", {info['duplicates']:,} duplicate(s) skipped" if info["duplicates"] else ""
        print(f"wrote {info['dir']} ({cfg.tokenizer}, {info['files']:,} file(s){skipped}): "
              f"vocab size {info['vocab_size']:,}, "
              f"train {info['train_tokens']:,} tokens ({info['train_chars']:,} characters), "
              f"val {info['val_tokens']:,} tokens ({info['val_chars']:,} characters)")
        return
    if len(cfg.input) > 1:
        raise ConfigError(f"prepare {cfg.dataset} reads one --input (got {len(cfg.input)})")
    input_path = cfg.input[0] if cfg.input else None
    if cfg.dataset in corpora.CORPORA:
        info = corpora.prepare(cfg.dataset, data_dir=cfg.data_dir, input_path=input_path, shard_size=cfg.shard_size,
                               num_proc=cfg.num_proc)
    else:
        info = data.prepare(cfg.dataset, data_dir=cfg.data_dir, input_path=input_path)
    shards = f" in {info['shards']} llm.c shards" if "shards" in info else ""
    print(f"wrote {info['dir']}: vocab size {info['vocab_size']:,}, "
          f"train {info['train_tokens']:,} tokens, val {info['val_tokens']:,} tokens{shards}")


def run_train(argv):
    cfg = options(TrainConfig, argv)
    parallel.start(cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.initialization_timeout,
                   cfg.heartbeat_timeout_seconds)
    result = train.train(cfg, log=print if jax.process_index() == 0 else lambda *_: None)  # process 0 speaks
    return 130 if result["stopped_by"] == "SIGINT" else 0  # SIGTERM (a scheduler's stop) is a clean exit


def run_sample(argv):
    cfg = options(SampleConfig, argv)
    one = cfg.num_samples == 1 and not cfg.start.startswith("LINES:")
    if cfg.stream or (cfg.stream is None and one and sys.stdout.isatty()):
        sample.stream(cfg, lambda text: print(text, end="", flush=True))
        print("\n---------------")
        return
    for text in sample.sample(cfg):
        print(text)
        print("---------------")


def run_eval(argv):
    cfg = options(EvalConfig, argv)
    if cfg.task == "hellaswag":
        r = evaluate.run_hellaswag(cfg)
        print(f"hellaswag {r['source']}: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} ({r['n']:,} examples)")
        return
    r = evaluate.run(cfg)
    bpc = "n/a (no stats.json: prepare the dataset again)" if r.bits_per_char is None else f"{r.bits_per_char:.4f}"
    print(f"{r.source}: loss {r.loss:.4f}, perplexity {r.perplexity:.2f}, bits/char {bpc} "
          f"({r.tokens:,} tokens, {r.batches:,} batches)")


def run_convert(argv):
    print(convert.convert(options(ConvertConfig, argv)))


def run_compile(argv):
    cfg = options(CompileConfig, argv)
    result = compile_check.compile_check(cfg)
    if cfg.json:
        print(json.dumps(result))
    if not result["fits"]:
        print(f"error: {result['error']}", file=sys.stderr)
        return 3
    return 0


CONFIGS = {"prepare": PrepareConfig, "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig,
           "convert": ConvertConfig, "compile": CompileConfig}  # --help lists their options
COMMANDS = {"prepare": run_prepare, "train": run_train, "sample": run_sample, "eval": run_eval,
            "convert": run_convert, "compile": run_compile, "plot": plot.main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("NANOGPT_JAX_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if argv and argv[0] in HELP:
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    if HELP & set(argv[1:]):
        print(helptext.command_help(argv[0], USAGE, CONFIGS.get(argv[0])), end="")
        return 0
    parallel.quiet_libtpu()
    quiet_orbax_failures()  # a failed save or restore is one error line, not orbax's thread tracebacks
    use_compile_cache(argv)
    if argv[0] != "train":  # train may join several processes first
        parallel.use_all_cpu_cores()
    try:
        code = COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        if debug:
            raise
        peers.stop_on_error(str(e))  # in a multi-process run: tell the others, and exit here
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:
        if debug or jax.process_count() == 1:
            raise
        peers.collective_failed(e)  # in a multi-process run most likely a peer died: one line, exit 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
