"""A training run set up: its model and state from init_from (scratch, a checkpoint, GPT-2), its data, and its
step compiled and held against the devices' memory, with every refusal made before any state is placed."""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from . import data, hellaswag, parallel
from .checkpoint import Checkpointer, RunRecord, refuse_existing_run
from .config import ConfigError, TrainConfig, options_set
from .load import crop, folder_meta, model_config, runtime, with_runtime
from .memory import (OutOfMemoryError, gib, param_count, per_device_bytes, refuse_unless_it_fits, remat_saves_memory,
                     training_bytes)
from .model import GPTConfig, init_params, num_params
from .pretrained import from_pretrained
from .program import CompiledTooBigError, Program
from .saving import repair_best
from .step import TrainState
from .tokenizers import kind


class Run(Program):
    """A training run: its program (layout, shardings, jitted steps) and the data it reads."""

    def __init__(self, cfg: TrainConfig, config: GPTConfig):
        super().__init__(cfg, config)
        # meta: the vocabulary, kept in checkpoints for sampling
        self.splits, self.meta = data.open_dataset(Path(cfg.data_dir) / cfg.dataset)
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * config.block_size
        self.hellaswag = self._hellaswag_examples() if cfg.hellaswag_interval else None

    def _hellaswag_examples(self) -> list:
        if self.meta is not None:
            raise ConfigError(f"--hellaswag_interval: HellaSwag is read in GPT-2 BPE; {self.cfg.dataset} is "
                              f"{kind(self.meta)} tokens (train on a GPT-2 BPE dataset, or leave the option out)")
        path = hellaswag.dataset_file(self.cfg.hellaswag_file, log=print)
        return hellaswag.read(path)

    def evaluate_hellaswag(self, state, it: int, metrics, log) -> None:
        result = hellaswag.evaluate(self.config, self.saved_state(state).params, self.hellaswag,
                                    batch_size=self.cfg.batch_size, mesh=self.mesh)
        log(f"step {it}: hellaswag acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
            f"({result['n']} examples)")
        metrics.log(iter=it, hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"])

    def record(self, iter_num: int, best_val_loss: float, best_iter: int | None) -> RunRecord:
        return RunRecord(train=dataclasses.asdict(self.cfg), model=dataclasses.asdict(self.config),
                         meta=self.meta, iter_num=iter_num, best_val_loss=best_val_loss, best_iter=best_iter)

    def _put(self, split: str, starts: np.ndarray, sharding):
        """Global (x, y) arrays of windows at `starts`; each process reads only its own devices' rows."""
        T, read = self.config.block_size, {}

        def windows(index):
            key = repr(index)
            if key not in read:  # x and y of one shard come from one read
                read[key] = data.read_windows(self.splits[split], starts[index[:-1]], T)
            return read[key]

        shape = (*starts.shape, T)
        return tuple(parallel.put_rows(sharding, shape, lambda index, i=i: windows(index)[i]) for i in (0, 1))

    def _starts(self, split: str, shape, *key) -> np.ndarray:
        # The key names process 0 whatever the process: every process draws the same global batch.
        return data.window_starts(len(self.splits[split]), self.config.block_size, shape,
                                  (self.cfg.seed, ("train", "val").index(split), 0, *key))

    def train_batch(self, iter_num: int):
        """The step's batch: gradient_accumulation_steps (A) x batch_size (B) windows, drawn as one global
        batch and laid out as layout.steps micro-batches of layout.rows rows (the same rows, the same update)."""
        A, B, L = self.cfg.gradient_accumulation_steps, self.cfg.batch_size, self.layout
        starts = self._starts("train", (A, B), iter_num).reshape(L.steps, L.rows)
        if not L.pmap:
            return self._put("train", starts, parallel.batch_sharding(self.mesh, 1))
        # pmap: device i takes rows i*R:(i+1)*R of every micro-batch, as the mesh would give it
        n = L.devices
        starts = starts.reshape(L.steps, n, L.rows // n).transpose(1, 0, 2)
        return self._put("train", starts, parallel.device_axis_sharding(self.mesh))

    def estimate_loss(self, params, it: int) -> dict:
        out = {}
        for split in ("train", "val"):
            losses = [self.eval(params, self._put(split, self._starts(split, (self.cfg.batch_size,), it, k),
                                                  self.eval_rows))
                      for k in range(self.cfg.eval_iters)]
            out[split] = float(np.mean(jax.device_get(losses)))
        return out


def _refuse_other_architecture(cfg: TrainConfig, saved: GPTConfig) -> None:
    """A resumed run keeps its checkpoint's architecture: an option the user set to something else is an error."""
    for key in ("model", "n_layer", "n_head", "n_embd", "block_size", "bias"):
        if key in options_set(cfg) and getattr(cfg, key) != getattr(saved, key):
            raise ConfigError(f"--{key}={getattr(cfg, key)!r} but the checkpoint in {cfg.out_dir} has {key}="
                              f"{getattr(saved, key)!r}: a resumed run keeps its architecture; drop the option, "
                              "or train into a new --out_dir")


MEMORY_ADVICE = "use a smaller model or --block_size, a smaller --batch_size or --micro_batch_size, --remat=full, or --fsdp"


def _training(config: GPTConfig, devices: int) -> str:
    return (f"training {param_count(config):,} parameters (n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"block_size={config.block_size}) on {devices} device(s)")


def _refuse_too_big(cfg: TrainConfig, config: GPTConfig) -> None:
    """Before anything is built, from the config alone: the state and one pass's activations must fit each
    device (an absurd size is refused before its parameters are drawn)."""
    devices = cfg.num_devices or jax.device_count()
    if not remat_saves_memory(config.scan_layers):
        config = dataclasses.replace(config, remat="none")
    need = training_bytes(config, max(1, (cfg.micro_batch_size or cfg.batch_size) // devices), cfg.fsdp)
    refuse_unless_it_fits(need, _training(config, devices), MEMORY_ADVICE, per_device=True)


def _compile_and_check(run: Run) -> str | None:
    """The train step compiled before any state is placed (its first call would compile it anyway), and its
    compiled per-device peak held against one device's memory: a run that cannot fit stops here. Returns the
    line to log once the run has started."""
    if run.layout.pmap:
        return None
    have = per_device_bytes()
    try:
        executable, figures = run.compile_step()
    except CompiledTooBigError as e:
        raise OutOfMemoryError(f"{_training(run.config, run.mesh.size)}: {e}; {MEMORY_ADVICE}") from None
    if figures.peak_bytes > have:
        raise OutOfMemoryError(f"{_training(run.config, run.mesh.size)} needs {gib(figures.peak_bytes)} per device "
                               f"(compiled) and each device has {gib(have)}: {MEMORY_ADVICE}")
    run.step = executable
    return f"compiled the train step in {figures.seconds:.1f} s: {gib(figures.peak_bytes)} per device"


def initial_state(cfg: TrainConfig, ckpt: Checkpointer):
    """(GPTConfig, params, base rng, iter_num, best_val_loss) for cfg.init_from; params and rng are
    None on resume (they are restored once the run's layout is known)."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    _, meta = data.open_dataset(dataset_dir)  # fails early if it is not prepared
    options = runtime(cfg)
    if cfg.init_from == "scratch":
        refuse_existing_run(cfg.out_dir, "continue it with --init_from=resume, or train into a new --out_dir")
        config = model_config(cfg, meta["vocab_size"] if meta else 50304)
        _refuse_too_big(cfg, config)
        return config, init_params(config, jax.random.PRNGKey(cfg.seed)), jax.random.PRNGKey(cfg.seed), 0, math.inf
    if cfg.init_from == "resume":
        record = ckpt.record(cfg.checkpoint)
        _refuse_other_architecture(cfg, record.config)
        data.check_vocabulary(record.meta, meta, dataset_dir)
        # The architecture comes from the checkpoint; dropout and the system options from the command line.
        config = with_runtime(record.config, **options)
        _refuse_too_big(cfg, config)
        return config, None, None, record.iter_num, record.best_val_loss
    refuse_existing_run(cfg.out_dir, "finetune into a new --out_dir")
    data.check_vocabulary(folder_meta(cfg.init_from), meta, dataset_dir)
    config, params = from_pretrained(cfg.init_from)
    config = with_runtime(config, **options)
    if cfg.block_size != config.block_size:
        config, params = crop(config, params, cfg.block_size)
    _refuse_too_big(cfg, config)
    return config, params, jax.random.PRNGKey(cfg.seed), 0, math.inf


@dataclasses.dataclass
class Progress:
    """Where a run stands: the next iteration, and the best evaluation so far (the one `best` holds)."""

    iter_num: int
    best_val_loss: float
    best_iter: int | None = None


def start(cfg: TrainConfig, ckpt: Checkpointer, log) -> tuple[Run, TrainState, jax.Array, Progress]:
    """The run built, its step compiled and checked against the devices' memory, its state restored (a damaged
    `best` repaired) or freshly placed."""
    config, params, rng, iter_num, best_val_loss = initial_state(cfg, ckpt)
    run = Run(cfg, config)
    data.check_splits(Path(cfg.data_dir) / cfg.dataset, run.splits, config.block_size, config.vocab_size)
    compiled = _compile_and_check(run)
    progress = Progress(iter_num, best_val_loss)
    if params is not None:
        state, rng = run.init_state(params), parallel.put_replicated(run.mesh, rng)
    else:
        state, rng = run.restore_state(ckpt, cfg.checkpoint)
    # Logged once the state is in place, so a refused checkpoint prints its one error line and nothing else.
    devices = f"{run.mesh.size} x {run.mesh.devices.flat[0].device_kind}"
    log(f"number of parameters: {num_params(run.abstract_state.params) / 1e6:.2f}M; tokens per iteration: "
        f"{run.tokens_per_iter:,}; devices: {devices}; dtype {config.dtype}")
    log(f"layout: {run.layout.describe()}")
    if config.remat != "none" and not remat_saves_memory(config.scan_layers):
        log("note: --remat saves no memory on a CPU with --scan_layers=False (XLA:CPU merges the recomputation "
            "away); keep the layers scanned, or shard the state with --fsdp")
    if compiled:
        log(compiled)
    if params is not None:
        return run, state, rng, progress
    record = ckpt.record(cfg.checkpoint)
    progress.best_iter = record.best_iter
    if cfg.checkpoint == "best":
        for moved in ckpt.set_aside("latest", after=iter_num):  # later saves would collide with them
            log(f"resuming from the best checkpoint (iteration {iter_num}): moved the later latest checkpoint to "
                f"{moved}")
    else:
        repair_best(ckpt, run, state, rng, record, log)
    return run, state, rng, progress
