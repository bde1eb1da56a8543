"""The PyTorch references a benchmark times against ours: transformers' GPT-2 trained as nanoGPT's loop does,
and transformers' `generate`, eager or under torch.compile with a static cache. torch and transformers are
the test extra's, imported only when a reference is asked for."""

import dataclasses
import time
from contextlib import nullcontext

import numpy as np

from nanogpt_jax import data
from nanogpt_jax.config import ConfigError
from nanogpt_jax.convert import with_zero_biases
from nanogpt_jax.model import GPTConfig
from nanogpt_jax.pretrained import hf_config, hf_tensors

from .presets import BenchConfig, backend


def torch_modules():
    """torch and transformers, imported only here: they are optional (the test extra)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError("--compare=torch needs torch and transformers: pip install -e '.[test]'") from None
    return torch, transformers


def torch_device(torch) -> str:
    return "cuda" if backend() == "gpu" and torch.cuda.is_available() else "cpu"


def hf_model(config: GPTConfig, params=None):
    """transformers' GPT2LMHeadModel of config's shape (SDPA attention; HF GPT-2 always has biases), holding
    `params` when given (a bias=False model's biases as zeros: the same function)."""
    torch, transformers = torch_modules()
    cfg = transformers.GPT2Config(**{**hf_config(dataclasses.replace(config, bias=True)),
                                     "bos_token_id": None, "eos_token_id": None})
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    if params is not None:
        config_b, params_b = (config, params) if config.bias else with_zero_biases(config, params)
        state = {name: torch.from_numpy(np.array(x)) for name, x in hf_tensors(config_b, params_b).items()}
        model.transformer.load_state_dict(state, strict=True)
    return model


class TorchTrain:
    """nanoGPT's training step with transformers' GPT-2: micro-batch forward/backward, clip, AdamW."""

    def __init__(self, cfg: BenchConfig, config: GPTConfig, micro_steps: int, rows: int, compiled: bool):
        torch, _ = self.torch, _ = torch_modules()
        self.name = "torch.compile" if compiled else "torch eager"
        self.cfg, self.config, self.micro_steps, self.rows = cfg, config, micro_steps, rows
        self.device = torch_device(torch)
        torch.manual_seed(0)
        model = hf_model(config).to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     fused=self.device == "cuda")
        self.model = torch.compile(model) if compiled else model
        self.autocast = (nullcontext() if config.dtype == "float32" else
                         torch.autocast(self.device, dtype=getattr(torch, config.dtype)))
        self.tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 200_000).astype(np.uint16)
        self.it, self.loss = 0, float("nan")
        t0 = time.perf_counter()
        self(1)  # the first step builds (or compiles) what the step needs
        self.compile_s = time.perf_counter() - t0

    def batch(self):
        torch = self.torch
        x, y = data.get_batch(self.tokens, self.config.block_size, (self.micro_steps, self.rows), (1, self.it))
        x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        if self.device == "cuda":
            return x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
        return x, y

    def __call__(self, n: int) -> float:
        torch = self.torch
        F = torch.nn.functional
        t0 = time.perf_counter()
        for _ in range(n):
            x_ABT, y_ABT = self.batch()
            for x_BT, y_BT in zip(x_ABT, y_ABT):
                with self.autocast:
                    logits = self.model(input_ids=x_BT, use_cache=False).logits
                    loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y_BT.view(-1)) / self.micro_steps
                loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.it += 1
        self.loss = loss.item() * self.micro_steps  # waits for the device
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 1e9 if self.device == "cuda" else None



class TorchDecode:
    """transformers' `generate`, greedy, exactly new_tokens tokens (no end-of-text stop). Eager: its dynamic
    KV cache. Compiled: a static cache of prompt + new tokens and the forward under torch.compile, as
    transformers' docs advise for fast decoding (CUDA graphs on a GPU: mode reduce-overhead)."""

    def __init__(self, cfg: BenchConfig, config: GPTConfig, params, prompt, compiled: bool = False):
        torch, _ = self.torch, _ = torch_modules()
        self.name = "transformers generate, torch.compile, static cache" if compiled else "transformers generate"
        self.device = torch_device(torch)
        model = hf_model(config, params).eval()
        if config.dtype != "float32":
            model = model.to(getattr(torch, config.dtype))
        self.model = model.to(self.device)
        self.ids = torch.from_numpy(np.asarray(prompt)).long().to(self.device)
        self.kw = dict(attention_mask=torch.ones_like(self.ids), do_sample=False, max_new_tokens=cfg.new_tokens,
                       min_new_tokens=cfg.new_tokens, pad_token_id=0, use_cache=True)
        if compiled:
            self.kw["cache_implementation"] = "static"
            mode = "reduce-overhead" if self.device == "cuda" else None
            self.model.forward = torch.compile(self.model.forward, mode=mode, fullgraph=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.tokens = self.model.generate(self.ids, **self.kw).cpu().numpy()
        self.compile_s = time.perf_counter() - t0

    def __call__(self, n: int) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                out = self.model.generate(self.ids, **self.kw)
            out.cpu()
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        return TorchTrain.peak_device_gb(self)
