"""from_pretrained / save_pretrained against transformers' GPT2LMHeadModel, the reference implementation of the
released GPT-2 weights. Every reference is randomly initialised here (small vocab and context, 2 layers, the
four GPT-2 widths); nothing is downloaded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from conftest import HF_POSITIONS as N_POS, HF_VOCAB as VOCAB, hf_gpt2
from nanogpt_jax.model import GPTConfig, init_params, make_model
from nanogpt_jax.pretrained import HUB_IDS, PretrainedError, from_pretrained, save_pretrained

N_LAYER = 2
SIZES = [(768, 12), (1024, 16), (1280, 20), (1600, 25)]  # (n_embd, n_head) of gpt2, -medium, -large, -xl
# gpt2's width in the quick set, the wider three with the slow tests
SIZE_PARAMS = [SIZES[0]] + [pytest.param(s, marks=pytest.mark.slow) for s in SIZES[1:]]
IDX_BT = np.random.default_rng(0).integers(0, VOCAB, (2, N_POS))


def hf_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDX_BT)).logits.numpy()


def jax_logits(config, params):
    return np.asarray(make_model(config).apply({"params": params}, jnp.asarray(IDX_BT))[0])


def write_hub_layout(model, folder, drop=(), reshape=None, extra=None):
    """The hub's model.safetensors layout: no `transformer.` prefix, causal-mask buffers, no lm_head."""
    tensors = {k.removeprefix("transformer."): v.numpy().copy() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((N_POS, N_POS), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    for k in drop:
        del tensors[k]
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, np.float32)
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(folder / "config.json"))
    return folder


@pytest.fixture(scope="module", params=SIZE_PARAMS, ids=lambda s: f"embd{s[0]}-head{s[1]}")
def reference(request):
    model = hf_gpt2(*request.param)
    return model, hf_logits(model)


@pytest.mark.parametrize("layout", ["hub", "save_pretrained"])
def test_logits_match_transformers(reference, layout, tmp_path):
    model, expected = reference
    if layout == "hub":
        write_hub_layout(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    config, params = from_pretrained(tmp_path)
    assert (config.n_layer, config.n_head, config.n_embd) == (N_LAYER, model.config.n_head, model.config.n_embd)
    assert (config.block_size, config.vocab_size, config.bias, config.dropout) == (N_POS, VOCAB, True, 0.0)
    np.testing.assert_allclose(jax_logits(config, params), expected, rtol=0, atol=1e-4)


def test_safetensors_file_and_pytorch_bin(tmp_path):
    model = hf_gpt2(768, 12)
    expected = hf_logits(model)
    write_hub_layout(model, tmp_path / "st")
    config, params = from_pretrained(tmp_path / "st" / "model.safetensors")
    np.testing.assert_allclose(jax_logits(config, params), expected, rtol=0, atol=1e-4)

    # an older save_pretrained layout: `transformer.` prefix and lm_head.weight, as a torch pickle
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model.config.to_json_file(str(tmp_path / "bin" / "config.json"))
    config, params = from_pretrained(str(tmp_path / "bin"))
    np.testing.assert_allclose(jax_logits(config, params), expected, rtol=0, atol=1e-4)


def test_pytorch_bin_without_torch(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 1, "n_head": 1, "n_embd": 8,
                                                      "n_positions": 8, "vocab_size": 16}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(PretrainedError, match="torch is not installed.*model.safetensors"):
        from_pretrained(tmp_path)


@pytest.mark.slow
def test_save_pretrained_loads_in_transformers_and_round_trips(tmp_path):
    config = GPTConfig(block_size=N_POS, vocab_size=VOCAB, n_layer=N_LAYER, n_head=4, n_embd=128)
    params = init_params(config, jax.random.key(0))
    # init gives LayerNorms (1, 0) and zero biases: perturb every leaf so a mix-up between them would show
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params))))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
    expected = jax_logits(config, params)

    save_pretrained(config, params, tmp_path)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    np.testing.assert_allclose(hf_logits(model.eval()), expected, rtol=0, atol=1e-4)

    config2, params2 = from_pretrained(tmp_path)
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params)


def test_save_pretrained_rejects_bias_false(tmp_path):
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, bias=False)
    with pytest.raises(PretrainedError, match="bias=False"):
        save_pretrained(config, init_params(config, jax.random.key(0)), tmp_path)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_model():
    return hf_gpt2(64, 4)


def test_missing_tensor_is_named(small_model, tmp_path):
    write_hub_layout(small_model, tmp_path, drop=["h.1.mlp.c_fc.weight"])
    with pytest.raises(PretrainedError, match=r"missing tensor h\.1\.mlp\.c_fc\.weight \[64, 256\]"):
        from_pretrained(tmp_path)


def test_wrong_shape_is_named(small_model, tmp_path):
    write_hub_layout(small_model, tmp_path, reshape={"wpe.weight": (32, 64)})
    with pytest.raises(PretrainedError, match=r"wpe\.weight has shape \[32, 64\], the config implies \[64, 64\]"):
        from_pretrained(tmp_path)


def test_all_problems_in_one_message(small_model, tmp_path):
    write_hub_layout(small_model, tmp_path, drop=["ln_f.bias"], reshape={"h.0.attn.c_proj.weight": (64, 65)},
                     extra={"h.0.attn.rotary": np.zeros(3, np.float32)})
    with pytest.raises(PretrainedError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    for part in ["missing tensor ln_f.bias", "h.0.attn.c_proj.weight has shape [64, 65]",
                 "unexpected tensor h.0.attn.rotary [3]", "n_embd=64"]:
        assert part in msg, msg


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(PretrainedError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PretrainedError, match="holds no weights: expected model.safetensors"):
        from_pretrained(tmp_path)


def test_safetensors_file_without_config(small_model, tmp_path):
    write_hub_layout(small_model, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(PretrainedError, match="no config.json beside it"):
        from_pretrained(tmp_path / "model.safetensors")


def test_config_this_model_cannot_run(small_model, tmp_path):
    write_hub_layout(small_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(activation_function="relu", n_head=5)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="activation_function is 'relu'.*n_embd 64 is not a multiple of n_head 5"):
        from_pretrained(tmp_path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache in offline mode. huggingface_hub reads these variables when it is imported (already
    done by transformers), so its constants are patched too."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.chdir(tmp_path)  # so a hub id is not found as a local folder by accident


def test_unknown_hub_id(offline_hub):
    with pytest.raises(PretrainedError) as err:
        from_pretrained("gpt3-xl")
    assert "'gpt3-xl'" in str(err.value)
    assert all(hub_id in str(err.value) for hub_id in HUB_IDS)


def test_known_hub_id_not_in_offline_cache(offline_hub):
    with pytest.raises(PretrainedError) as err:
        from_pretrained("openai-community/gpt2-medium")
    msg = str(err.value)
    assert "'openai-community/gpt2-medium'" in msg and "config.json" in msg and "HF_HUB_OFFLINE" in msg
    assert "local folder" in msg and "\n" not in msg
