"""Options with nanoGPT's names: dataclass defaults, then CONFIG.py files, then --key=value (or --key value).

Config files are plain Python that assign values (as nanoGPT's config/*.py) and are run as Python: run only
config files you trust. Command-line values are parsed as Python literals, never executed, and checked
against the option's type. This is the bottom layer: every other module may import it, it imports none.
"""

import ast
import dataclasses
import difflib
import math
import os
import runpy
import sys
import traceback
import types
import typing
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """A path in nanogpt-jax's folder of the user's cache: $XDG_CACHE_HOME/nanogpt-jax, else ~/.cache/nanogpt-jax."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home, "nanogpt-jax", *parts)


class UserError(ValueError):
    """Bad input from the user: the command line prints its message as one line and exits non-zero."""


class ConfigError(UserError):
    """A bad option; the message names it and says what was expected."""


REMAT = ("none", "full", "dots")  # model.REMAT_POLICIES' names


@dataclasses.dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # where checkpoints/, metrics.jsonl and the run lock go
    eval_interval: int = 2000  # evaluate (and save) every this many iterations
    log_interval: int = 1  # log loss, lr, time and MFU every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation
    eval_only: bool = False  # evaluate once where the run stands, then stop
    always_save_checkpoint: bool = True  # if False, save only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume', or a GPT-2 name / HF folder
    checkpoint: str = "latest"  # init_from='resume' continues from 'latest', or from 'best' (e.g. latest is damaged)
    force_unlock: bool = False  # take over out_dir/.lock that names a process no flock holds (another host's)
    # HellaSwag's acc / acc_norm (GPT-2 BPE models only)
    hellaswag_interval: int = 0  # every this many iterations and at the last (0 = never)
    hellaswag_file: str | None = None  # the jsonl to score (None: the validation set, downloaded once into the cache)
    # profiling
    profile: str | None = None  # START:STOP: a jax.profiler trace of iterations START..STOP-1 in out_dir/profile
    # data
    dataset: str = "openwebtext"  # the prepared folder DATA_DIR/DATASET
    data_dir: str = "data"  # the folder holding the prepared datasets
    gradient_accumulation_steps: int = 40  # micro-batches of batch_size rows per update
    batch_size: int = 12  # rows per micro-batch
    block_size: int = 1024  # context length in tokens
    # rows per forward/backward pass (0 = batch_size): the step accumulates gradients over the pieces,
    # so the update is the same while activation memory shrinks; often faster on CPU too
    micro_batch_size: int = 0
    # model
    model: str = "gpt"  # 'gpt' or 'bigram'
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout rate, in [0, 1)
    bias: bool = False  # biases in the Linear and LayerNorm layers (GPT-2 has them)
    # AdamW
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # iterations in all
    weight_decay: float = 1e-1  # AdamW decoupled weight decay (matrices and embeddings only)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    # learning-rate schedule
    decay_lr: bool = True  # warm up then cosine-decay the learning rate (False: constant)
    warmup_iters: int = 2000  # linear warm-up iterations
    lr_decay_iters: int = 600000  # the cosine reaches min_lr here (about max_iters)
    min_lr: float = 6e-5  # the learning rate after the decay (about learning_rate / 10)
    # a step whose loss or gradient norm is NaN/inf leaves params and optimizer state as they were (counted in
    # the log); off, a NaN/inf loss stops the run, keeping the last checkpoint
    skip_nonfinite_steps: bool = False
    # system
    dtype: str = "auto"  # 'float32', 'bfloat16', 'float16'; auto = float32 on CPU, bfloat16 elsewhere
    attn_impl: str | None = None  # None/'xla', or 'cudnn' (NVIDIA, bf16/fp16)
    # what each block keeps for the backward pass: 'none' (all), 'full' (its input: the rest is recomputed),
    # 'dots' (its matmul outputs); True / False mean 'full' / 'none'
    remat: str | bool = "none"
    # compile one layer body and loop it (lax.scan: compile time and FSDP's memory independent of depth), or
    # unroll the layers (XLA:CPU runs small models faster unrolled); None: unrolled on a CPU, scanned elsewhere.
    # Training and evaluation: decoding always runs the layers one by one
    scan_layers: bool | None = None
    num_devices: int = 0  # devices to use; 0 = all of them when the batch can be split evenly over them
    fsdp: int = 1  # shard params and optimizer state over this many devices (1 = pure data parallelism)
    parallel: str = "mesh"  # 'mesh' (jit over a device mesh) or 'pmap'
    # several processes (hosts): jax.distributed's own names; TPU pods, SLURM and Open MPI need none of them
    coordinator_address: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None  # processes in all
    process_id: int | None = None  # this process's index, 0 .. num_processes - 1
    initialization_timeout: int = 300  # seconds to wait for every process to join; then one error line, exit 2
    heartbeat_timeout_seconds: int = 100  # a process silent this long is taken for dead: the others stop, exit 2
    seed: int = 1337  # seeds the initial weights, dropout and the batches (0 .. 2**32 - 1)
    # Weights & Biases (pip install 'nanogpt-jax[wandb]'; WANDB_MODE=offline works without an account)
    wandb_log: bool = False  # mirror metrics.jsonl to Weights & Biases
    wandb_project: str = "owt"  # its project
    wandb_run_name: str = "gpt2"  # its run name

    def __post_init__(self):
        _at_least(self, 1, "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                  "batch_size", "block_size", "n_layer", "n_head", "n_embd")
        _at_least(self, 0, "max_iters", "micro_batch_size", "num_devices", "warmup_iters", "lr_decay_iters",
                  "process_id", "hellaswag_interval")
        profile_range(self.profile)
        _at_least(self, 1, "fsdp", "num_processes")
        _timeouts(self)
        _seed(self)
        if self.checkpoint not in ("latest", "best"):
            raise ConfigError(f"--checkpoint={self.checkpoint}: use latest or best")
        if isinstance(self.remat, bool):
            self.remat = "full" if self.remat else "none"
        if self.remat not in REMAT:
            raise ConfigError(f"--remat={self.remat}: use one of {', '.join(REMAT)} (True means full)")
        if self.parallel not in ("mesh", "pmap"):
            raise ConfigError(f"--parallel={self.parallel}: use mesh or pmap")
        if self.parallel == "pmap" and self.fsdp > 1:
            raise ConfigError("--fsdp needs --parallel=mesh (pmap keeps a whole copy of the state per device)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n_embd={self.n_embd} must be a multiple of --n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout={self.dropout}: must be in [0, 1)")
        if self.model not in ("gpt", "bigram"):
            raise ConfigError(f"--model={self.model}: use gpt or bigram")
        if self.attn_impl not in (None, "xla", "cudnn"):
            raise ConfigError(f"--attn_impl={self.attn_impl}: use None (XLA's choice), xla or cudnn")
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{key}={value}: must be a finite number, at least 0")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:  # also refuses NaN
                raise ConfigError(f"--{key}={value}: must be in [0, 1)")


@dataclasses.dataclass
class CompileConfig(TrainConfig):
    topology: str | None = None  # a TPU topology libtpu knows (v5e:2x4, v4:2x2x2, ...); None: this machine's devices
    what: str = "train"  # 'train' (the train step) or 'generate'
    json: bool = False  # also print the figures as one JSON object on the last line
    # generate: batch rows, prompt and new tokens per row
    num_samples: int = 1  # batch rows
    prompt_tokens: int = 1  # prompt tokens per row
    max_new_tokens: int = 256  # new tokens per row

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, 1, "num_samples", "prompt_tokens")
        _at_least(self, 0, "max_new_tokens")
        if self.what not in ("train", "generate"):
            raise ConfigError(f"--what={self.what}: use train or generate")


@dataclasses.dataclass
class LoadConfig:
    """Where a command that loads a model finds it: a run's checkpoint or a GPT-2 name / HF folder."""

    init_from: str = "resume"  # 'resume' (the checkpoint in out_dir) or a GPT-2 name / HF folder
    out_dir: str = "out"  # the run whose checkpoint is loaded (init_from='resume')
    checkpoint: str = "latest"  # 'latest' or 'best'
    dtype: str = "auto"  # 'float32', 'bfloat16', 'float16'; auto = float32 on CPU, bfloat16 elsewhere

    def __post_init__(self):
        if self.checkpoint not in ("latest", "best"):
            raise ConfigError(f"--checkpoint={self.checkpoint}: use latest or best")


@dataclasses.dataclass
class SampleConfig(LoadConfig):
    start: str = "\n"  # or "FILE:prompt.txt" (one prompt), "LINES:prompts.txt" (one per line, one batch)
    num_samples: int = 10  # per prompt
    max_new_tokens: int = 500  # tokens sampled per sample
    temperature: float = 0.8  # divides the logits; 0 = greedy
    top_k: int | None = 200  # sample among the k likeliest tokens (None: all)
    top_p: float | None = None  # sample among the likeliest tokens holding this much probability, in (0, 1]
    seed: int = 1337  # seeds the sampling (0 .. 2**32 - 1)
    stop: str | None = None  # end a sample at this text (a one-token stop also ends decoding early)
    stream: bool | None = None  # print text as it is made; None: when one sample goes to a terminal
    fsdp: int = 1  # split the weights over this many of this machine's devices (a model larger than one)

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, 1, "num_samples", "top_k")
        _at_least(self, 1, "fsdp")
        if self.stop == "":
            raise ConfigError("--stop is empty: give the text a sample ends at (e.g. --stop='<|endoftext|>')")
        _at_least(self, 0, "max_new_tokens", "temperature")
        _seed(self)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p={self.top_p}: must be in (0, 1]")


@dataclasses.dataclass
class EvalConfig(LoadConfig):
    dataset: str | None = None  # None: the run's dataset (resume), else openwebtext
    data_dir: str | None = None  # None: the run's data_dir (resume), else 'data'
    split: str = "val"  # 'val' or 'train'
    input: str | None = None  # a plain text file to evaluate instead of a dataset split
    batch_size: int | None = None  # None: the run's batch_size (resume), else 12
    block_size: int | None = None  # None: the model's context length; smaller crops it
    eval_iters: int = 200  # random batches, as train's estimate; 0 = every non-overlapping window once
    seed: int = 1337  # seeds the random batches (0 .. 2**32 - 1)
    eval_only: bool = True  # accepted so that nanoGPT's eval configs run here too; eval never trains
    task: str = "loss"  # 'loss' (the options above) or 'hellaswag' (batch_size: examples per forward pass)
    hellaswag_file: str | None = None  # None: rowanz/hellaswag's hellaswag_val.jsonl, downloaded once

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, 1, "batch_size", "block_size")
        _at_least(self, 0, "eval_iters")
        _seed(self)
        if self.split not in ("train", "val"):
            raise ConfigError(f"--split={self.split}: use one of train, val")
        if self.task not in ("loss", "hellaswag"):
            raise ConfigError(f"--task={self.task}: use loss or hellaswag")
        if self.hellaswag_file is not None and self.task != "hellaswag":
            raise ConfigError(f"--hellaswag_file={self.hellaswag_file} needs --task=hellaswag")


@dataclasses.dataclass
class ConvertConfig(LoadConfig):
    # init_from 'resume': out_dir's checkpoint -> hf_dir; a GPT-2 name / HF folder -> out_dir
    hf_dir: str | None = None  # the HuggingFace folder to write (export only)


@dataclasses.dataclass
class PrepareConfig:
    dataset: str = ""  # also the first bare word: nanogpt-jax prepare shakespeare_char
    # the text instead of the shipped copy; `prepare text`: files, folders or globs, --input repeated for several
    input: tuple[str, ...] = ()
    data_dir: str = "data"  # the folder the dataset folder is written in
    shard_size: int = 100_000_000  # fineweb_edu: tokens per llm.c shard
    num_proc: int = 0  # openwebtext, fineweb_edu: tokenizing threads (0 = one per CPU core)
    # prepare text: the dataset's folder name under data_dir, its tokenizer, its size (word, sentencepiece)
    name: str = ""  # the folder under data_dir, and the --dataset to train
    tokenizer: str = "gpt2"  # 'char', 'word', 'gpt2' or 'sentencepiece'
    vocab_size: int = 8192  # word and sentencepiece: every id, <unk> included
    val_fraction: float = 0.1  # the last val_fraction of the corpus's characters is the val split
    force_unlock: bool = False  # take over DATA_DIR/NAME/.lock that names a process no flock holds (another host's)

    def __post_init__(self):
        _at_least(self, 1, "shard_size")
        _at_least(self, 0, "num_proc")
        _at_least(self, 2, "vocab_size")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.tokenizer not in ("char", "word", "gpt2", "sentencepiece"):
            raise ConfigError(f"--tokenizer={self.tokenizer}: use char, word, gpt2 or sentencepiece")


def profile_range(text: str | None) -> range | None:
    """--profile=START:STOP as the iterations it traces."""
    if text is None:
        return None
    start, colon, stop = str(text).partition(":")
    if not (colon and start.isdigit() and stop.isdigit() and int(start) < int(stop)):
        raise ConfigError(f"--profile={text}: give START:STOP, iterations with START < STOP (e.g. --profile=10:15)")
    return range(int(start), int(stop))


def _at_least(cfg, low, *keys):
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not value >= low:  # also refuses NaN (a config file's float("nan"))
            raise ConfigError(f"--{key}={value}: must be at least {low}")


def _seed(cfg):
    # JAX keys use the seed's low 32 bits (x64 off): a larger seed would silently repeat a smaller one's run
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"--seed={cfg.seed}: must be in 0 .. {2**32 - 1:,}")


def _timeouts(cfg):
    # JAX passes them to C++ as 32-bit ints (the heartbeat doubled, plus a margin): keep far below that
    for key in ("initialization_timeout", "heartbeat_timeout_seconds"):
        if not 1 <= getattr(cfg, key) <= 10**6:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be in 1 .. 1,000,000 seconds")


# nanoGPT options that mean nothing here (or nothing to this command): accepted so that nanoGPT command lines
# and configs run, with a note.
IGNORED = {
    "compile": "XLA always compiles",
    "device": "JAX picks the accelerator; set JAX_PLATFORMS=cpu to force the CPU",
    "backend": "JAX picks the collective backend",
    "wandb_log": "only train logs to Weights & Biases",
    "wandb_project": "only train logs to Weights & Biases",
    "wandb_run_name": "only train logs to Weights & Biases",
}


def _repeated(hint) -> bool:
    """A tuple[str, ...] option: --key=value repeated on the command line gives every value."""
    return typing.get_origin(hint) is tuple


def _allowed_types(hint) -> tuple:
    """The types an option accepts: `int`, `int | None` and `typing.Optional[int]` alike."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check(cls, key: str, value, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown option --{key} ({source}){hint}")
    hint = typing.get_type_hints(cls)[key]
    if _repeated(hint):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"--{key}={value!r} ({source}): expected a string or a list of strings "
                          f"(repeat --{key} for several)")
    allowed = _allowed_types(hint)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and type(value) is int:
            return float(value)
        if t is not type(None) and type(value) is t:
            return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"--{key}={value!r} ({source}): expected {names}, got {type(value).__name__}")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word such as --dataset=shakespeare_char is a string


def run_config_file(path: str) -> dict:
    """The names a CONFIG.py file assigns; any failure to run it is one `config FILE, line N: what` error."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder: give a CONFIG.py file")
    with open(path, "rb") as f:
        source = f.read()
    if b"\0" in source:
        line = source[:source.index(b"\0")].count(b"\n") + 1
        raise ConfigError(f"config {path}, line {line}: a NUL byte; is it a Python file?")
    try:
        return runpy.run_path(path)
    except SyntaxError as e:  # also bad indentation and undecodable text
        where = f", line {e.lineno}" if e.lineno else ""
        raise ConfigError(f"config {path}{where}: {type(e).__name__}: {e.msg}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        target = os.path.abspath(path)
        lines = [f.lineno for f in traceback.extract_tb(sys.exc_info()[2])
                 if os.path.abspath(f.filename) == target]
        where = f", line {lines[-1]}" if lines else ""
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ConfigError(f"config {path}{where}: {what}") from None


def parse(cls, argv: list[str], notes: list[str] | None = None, positional: str | None = None):
    """Build `cls` from CONFIG.py files and --key=value / --key value overrides, in order.

    `notes` collects a line per ignored nanoGPT option; `positional` names the field a bare first word
    fills (prepare's dataset)."""
    values = {}
    repeated = {f.name for f in dataclasses.fields(cls) if _repeated(typing.get_type_hints(cls)[f.name])}
    given = set()  # options given on the command line: a repeated one adds to the first, another replaces it

    def put(key, value, source):
        if key in IGNORED and key not in {f.name for f in dataclasses.fields(cls)}:
            if notes is not None:
                notes.append(f"--{key} has no effect in nanogpt-jax: {IGNORED[key]}")
            return
        value = _check(cls, key, value, source)
        if source == "command line" and key in given:
            if key in repeated:
                value = values[key] + value
            elif notes is not None and value != values[key]:
                notes.append(f"--{key} is given twice ({values[key]!r}, then {value!r}): the last, "
                             f"{value!r}, is used")
        if source == "command line":
            given.add(key)
        values[key] = value

    args = list(argv)
    if positional and args and not args[0].startswith("--") and not args[0].endswith(".py"):
        put(positional, args.pop(0), "command line")
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if set(_allowed_types(typing.get_type_hints(cls).get(key))) - {type(None)} == {bool} and (
                        not args or args[0] not in ("True", "False")):
                    text = "True"  # a bare switch: --json
                elif not args or args[0].startswith("--"):
                    raise ConfigError(f"{arg} needs a value: write {arg}=VALUE or {arg} VALUE")
                else:
                    text = args.pop(0)
            put(key, text if key in repeated else _literal(text), "command line")  # paths, not literals
        elif arg.endswith(".py"):
            scope = run_config_file(arg)
            for key, value in scope.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    put(key, value, arg)
        else:
            raise ConfigError(f"{arg!r}: expected a CONFIG.py file or --key=value")
    cfg = cls(**values)
    cfg._options_set = frozenset(values)  # what the user set, in a file or on the command line (see options_set)
    return cfg


def options_set(cfg) -> frozenset:
    """The options the user set: recorded by parse; for a config built in Python (or copied with
    dataclasses.replace), those that differ from their defaults."""
    if hasattr(cfg, "_options_set"):
        return cfg._options_set
    return frozenset(f.name for f in dataclasses.fields(cfg)
                     if f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default)
