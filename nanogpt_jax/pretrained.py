"""Load released GPT-2 weights into the Flax GPT, and save a GPT back in HuggingFace's GPT-2 format.

model.py names its parameters after HF GPT-2, so the mapping is a rename, one place (`hf_name`), plus the
layer axis of the stacked blocks: layer 3 of ('h', 'attn', 'c_attn', 'kernel') <-> 'h.3.attn.c_attn.weight',
('ln_f', 'scale') <-> 'ln_f.weight'. HF's Conv1D stores weights [in, out], as a Flax Dense kernel does, so
no tensor is transposed.

Sources: a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, also under openai-community/), a local folder
holding config.json + model.safetensors (or pytorch_model.bin), or a .safetensors file with config.json
beside it. Reading needs neither torch nor transformers; pytorch_model.bin needs torch.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from huggingface_hub import constants, hf_hub_download
from safetensors import safe_open

from .config import UserError
from .memory import param_count, refuse_unless_it_fits
from .model import DTYPES, GPTConfig, init_params

_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_IDS = _SIZES + tuple(f"openai-community/{s}" for s in _SIZES)
HUB_FILES = ("config.json", "model.safetensors")  # all we need from a hub repo (it also holds .bin, msgpack, ...)

# Tensors HF files may hold that are not parameters here: the causal-mask buffers of older files
# (h.N.attn.bias [1, 1, T, T], h.N.attn.masked_bias []) and lm_head.weight, which GPT-2 ties to wte.
_NOT_PARAMS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight")

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

# HF GPT-2 options that model.py hard-codes: config.json must hold one of these values (or leave the key out:
# HF's defaults are the first value).
_HF_FIXED = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are the tanh-approximated GELU
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
}


# The released models' sizes (their config.json files), so that a config can be checked without a download.
KNOWN_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}

SIZE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "n_ctx", "vocab_size", "n_inner")


class PretrainedError(UserError):
    """A checkpoint could not be found or read, or does not fit GPT-2; the message says what and where."""


# --------------------------------------------------------------------------------------------- the mapping


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """Flax parameter path (and layer, for the stacked blocks under h) -> HF GPT-2 key (hub layout, no
    `transformer.` prefix)."""
    *modules, leaf = path
    modules = [f"h.{layer}" if m == "h" else m for m in modules]
    return ".".join(modules + [_LEAF_TO_HF[leaf]])


def hf_layout(config: GPTConfig) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
    """HF key -> (Flax path, layer or None, the HF tensor's shape) for every parameter of `config`'s GPT; load
    and save both go through this.

    The tree comes from the model itself (jax.eval_shape allocates nothing), so it cannot drift from model.py.
    """
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    layout = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in key_path)
        if path[0] == "h":
            for i in range(leaf.shape[0]):
                layout[hf_name(path, i)] = (path, i, tuple(leaf.shape[1:]))
        else:
            layout[hf_name(path)] = (path, None, tuple(leaf.shape))
    return layout


def hf_config(config: GPTConfig) -> dict:
    """config.json content that transformers' GPT2LMHeadModel reads as this model."""
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "vocab_size": config.vocab_size,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }
    if config.vocab_size > 50256:  # GPT-2's <|endoftext|>; transformers warns about ids outside the vocabulary
        cfg.update(bos_token_id=50256, eos_token_id=50256)
    return cfg


# ------------------------------------------------------------------------------------------------- loading


def from_pretrained(name_or_path, *, dtype: str = "float32") -> tuple[GPTConfig, dict]:
    """(GPTConfig, float32 params) of a released GPT-2 or a saved one; `dtype` is the compute dtype."""
    if dtype not in DTYPES:
        raise PretrainedError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    config_path, weights_path = _resolve(str(name_or_path))
    config = _read_config(config_path, dtype)
    return config, _read_params(config, weights_path)


def pretrained_config(name_or_path, *, dtype: str = "float32") -> GPTConfig:
    """The GPTConfig of a released GPT-2 (from its known sizes) or of a saved one (its config.json): nothing is
    downloaded and no weights are read."""
    name = str(name_or_path).removeprefix("openai-community/")
    if name in KNOWN_SIZES:
        n_layer, n_head, n_embd = KNOWN_SIZES[name]
        return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         dropout=0.0, bias=True, dtype=dtype)
    return _read_config(_resolve(str(name_or_path))[0], dtype)


def _resolve(name: str) -> tuple[Path, Path]:
    """(config.json, weights file) for a local folder, a local .safetensors file or a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PretrainedError(f"{path} has no config.json (the HF GPT-2 config that goes with the weights)")
        for weights in ("model.safetensors", "pytorch_model.bin"):
            if (path / weights).is_file():
                return path / "config.json", path / weights
        raise PretrainedError(f"{path} holds no weights: expected model.safetensors (or pytorch_model.bin) "
                              "beside config.json")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise PretrainedError(f"{path}: pass a folder or a .safetensors file (a .bin loads from its folder)")
        if not (path.parent / "config.json").is_file():
            raise PretrainedError(f"{path} has no config.json beside it; put the model's HF config.json there")
        return path.parent / "config.json", path
    if name in HUB_IDS:
        return _download(name)
    raise PretrainedError(f"{name!r} is neither a local folder or file nor a known GPT-2 hub id: "
                          f"use one of {', '.join(HUB_IDS)}")


def _download(repo_id: str) -> tuple[Path, Path]:
    """The two files we need, from huggingface_hub's cache or the hub (HF_HOME, HF_HUB_OFFLINE are honoured)."""
    paths = []
    for filename in HUB_FILES:
        try:
            paths.append(Path(hf_hub_download(repo_id, filename)))
        except Exception as e:  # offline, no network, no such repo or file: each its own type, one meaning here
            offline = ", HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
            raise PretrainedError(
                f"could not get {filename} of {repo_id!r} from the HuggingFace hub or its cache "
                f"({type(e).__name__}{offline}); fetch it with network access, or pass a local folder holding "
                f"config.json and model.safetensors: from_pretrained('path/to/folder')") from e
    return paths[0], paths[1]


def _read_config(config_path: Path, dtype: str) -> GPTConfig:
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {config_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise PretrainedError(f"{config_path} holds a JSON {type(cfg).__name__}, not an object of GPT-2 options")
    bad = [f"{k} is {cfg[k]!r}, expected a positive integer" for k in SIZE_KEYS
           if k in cfg and (type(cfg[k]) is not int or cfg[k] < 1) and not (k == "n_inner" and cfg[k] is None)]
    if bad:
        raise PretrainedError(f"{config_path} is not a GPT-2 config this model can run: " + "; ".join(bad))
    problems = [f"{k} is {cfg[k]!r}, expected {' or '.join(map(repr, ok))}"
                for k, ok in _HF_FIXED.items() if k in cfg and cfg[k] not in ok]
    block_size = cfg.get("n_positions", cfg.get("n_ctx"))  # n_ctx: the name in older GPT-2 configs
    sizes = {"n_layer": cfg.get("n_layer"), "n_head": cfg.get("n_head"), "n_embd": cfg.get("n_embd"),
             "n_positions": block_size, "vocab_size": cfg.get("vocab_size")}
    problems += [f"{k} is missing" for k, v in sizes.items() if v is None]
    if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 0)):
        problems.append(f"n_inner is {cfg['n_inner']}, this model's MLP is 4 * n_embd wide")
    if isinstance(cfg.get("n_embd"), int) and isinstance(cfg.get("n_head"), int) and cfg["n_embd"] % cfg["n_head"]:
        problems.append(f"n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
    if problems:
        raise PretrainedError(f"{config_path} is not a GPT-2 config this model can run: " + "; ".join(problems))
    return GPTConfig(block_size=block_size, vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0, bias=True, dtype=dtype)


def _read_params(config: GPTConfig, weights_path: Path) -> dict:
    shapes, read = _open_weights(weights_path)
    _check_layers(config, shapes, weights_path)
    layout = hf_layout(config)

    # Check names and shapes from the header first: a wrong file fails before gigabytes are read.
    found, problems = {}, []  # found: HF name -> key in the file
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")  # recent save_pretrained writes the base model's prefix
        if _NOT_PARAMS.fullmatch(name):
            continue
        if name not in layout:
            problems.append(f"unexpected tensor {key} {list(shape)}")
        elif name in found:
            problems.append(f"tensor {name} appears twice ({found[name]}, {key})")
        else:
            found[name] = key
            if shape != layout[name][2]:
                problems.append(f"{key} has shape {list(shape)}, the config implies {list(layout[name][2])}")
    problems += [f"missing tensor {name} {list(shape)}" for name, (_, _, shape) in layout.items()
                 if name not in found]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise PretrainedError(
            f"{weights_path} does not fit GPT-2 with n_layer={config.n_layer}, n_head={config.n_head}, "
            f"n_embd={config.n_embd}, block_size={config.block_size}, vocab_size={config.vocab_size} "
            f"(from config.json):\n  " + "\n  ".join(shown))
    refuse_unless_it_fits(4 * param_count(config), f"loading {weights_path} ({param_count(config):,} parameters)",
                          "load it on a machine with more memory")

    # One stacked leaf at a time: its layers read into one float32 host array, copied into a jax array, and the
    # host copy dropped, so loading holds the growing tree plus one leaf, never two copies of the model.
    by_path = {}
    for name, (path, layer, shape) in layout.items():
        by_path.setdefault(path, []).append((name, layer, shape))
    params = {}
    for path, tensors in by_path.items():
        _, layer, shape = tensors[0]
        host = np.empty(shape if layer is None else (len(tensors), *shape), np.float32)
        for name, layer, _ in tensors:
            host[() if layer is None else layer] = read(found[name])
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(host)
        del host
    return params


def _check_layers(config: GPTConfig, shapes: dict, weights_path: Path) -> None:
    """config.json's n_layer against the file's layers, from the header: the layout check below builds the model
    abstractly, which for a config claiming a million layers would trace for minutes."""
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    found = max(layers) + 1 if layers else 0
    if found != config.n_layer:
        raise PretrainedError(f"{weights_path.parent / 'config.json'} does not match {weights_path.name}: "
                              f"n_layer={config.n_layer:,} but the tensors have {found:,} layers")


def _open_weights(path: Path):
    """({key: shape}, read(key) -> np.ndarray) for a .safetensors or a torch pytorch_model.bin file."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="np") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types, and OSError
            raise PretrainedError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from e
        _refuse_integer_tensors(path, dtypes)

        def read(key):
            # Reopen per tensor: safe_open memory-maps the file and every page a read touches stays in our
            # resident memory until it is closed; one open for the whole loop peaks at 2x the model size.
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(key)

        return shapes, read
    try:
        import torch
    except ImportError as e:
        raise PretrainedError(f"{path} is a torch file and torch is not installed: pip install torch, or "
                              "use the model.safetensors of the same model (no torch needed)") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise PretrainedError(f"{path} is not a readable torch file (truncated or damaged?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} does not hold a state dict of tensors")
    _refuse_integer_tensors(path, {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()
                                   if not v.is_floating_point()})
    # pop: each torch tensor is freed once its float32 copy is in the tree.
    return {k: tuple(v.shape) for k, v in state.items()}, lambda key: state.pop(key).float().numpy()


def _refuse_integer_tensors(path: Path, dtypes: dict) -> None:
    """GPT-2's weights are floating point; integer or boolean ones (quantized, or not weights) would load as
    numbers that mean something else."""
    wrong = sorted(k for k, d in dtypes.items() if not re.fullmatch(r"(F|BF)\d+|float\d*|bfloat16|half|double", d)
                   and not _NOT_PARAMS.fullmatch(k.removeprefix("transformer.")))
    if wrong:
        raise PretrainedError(f"{path} holds non-floating-point tensors ({wrong[0]} is {dtypes[wrong[0]]}"
                              f"{f', and {len(wrong) - 1} more' if len(wrong) > 1 else ''}): GPT-2 weights are floats")


def hf_tensors(config: GPTConfig, params) -> dict[str, np.ndarray]:
    """HF key -> float32 host array of every parameter: the stacked blocks cut into their layers."""
    leaves = {tuple(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {name: np.asarray(leaves[path] if layer is None else leaves[path][layer], dtype=np.float32)
            for name, (path, layer, _) in hf_layout(config).items()}


def refuse_existing_model(folder, what: str) -> None:
    """An export never writes over a folder that holds a model's files."""
    present = [name for name in ("config.json", "model.safetensors", "pytorch_model.bin")
               if (Path(folder) / name).exists()]
    if present:
        raise PretrainedError(f"{folder} already holds a model ({', '.join(present)}): {what}")


# -------------------------------------------------------------------------------------------------- saving


def save_pretrained(config: GPTConfig, params, folder) -> None:
    """Write config.json + model.safetensors (float32, hub layout) that transformers' GPT2LMHeadModel loads."""
    if config.model != "gpt":
        raise PretrainedError(f"only the GPT model has a HuggingFace GPT-2 form, not {config.model!r}")
    if not config.bias:
        raise PretrainedError("HF GPT-2 always has biases in its Linears and LayerNorms: a bias=False model "
                              "cannot be saved in its format")
    layout = hf_layout(config)
    leaves = {tuple(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    expected = {path: (shape if layer is None else (config.n_layer, *shape))
                for path, layer, shape in layout.values()}
    problems = [f"unexpected parameter {'/'.join(p)}" for p in leaves if p not in expected]
    problems += [f"missing parameter {'/'.join(p)}" for p in expected if p not in leaves]
    problems += [f"{'/'.join(p)} has shape {list(leaves[p].shape)}, the config implies {list(s)}"
                 for p, s in expected.items() if p in leaves and tuple(leaves[p].shape) != s]
    if problems:
        raise PretrainedError("params do not match the config: " + "; ".join(problems))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    tensors = hf_tensors(config, params)
    # transformers refuses safetensors files without format metadata.
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
