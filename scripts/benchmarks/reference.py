"""The PyTorch references a benchmark times against ours: transformers' GPT-2 trained as nanoGPT's loop does,
and transformers' `generate`, eager or under torch.compile with a static cache. torch and transformers are
the test extra's, imported only when a reference is asked for."""

import dataclasses
import math
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


def torch_gpt(config: GPTConfig):
    """nanoGPT's GPT in torch, written for this benchmark: ours' architecture, biases or none as config.bias
    says (transformers' GPT-2 always has them), tanh GELU, tied embeddings, SDPA causal attention, nanoGPT's
    init and dropouts. Parameter names are ours' with dots (h.N.attn.c_attn.weight is (out, in))."""
    torch, _ = torch_modules()
    nn, F = torch.nn, torch.nn.functional
    C, L, p = config.n_embd, config.n_layer, config.dropout

    def linear(n_in, n_out, std=0.02):
        layer = nn.Linear(n_in, n_out, bias=config.bias)
        nn.init.normal_(layer.weight, std=std)
        if config.bias:
            nn.init.zeros_(layer.bias)
        return layer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=config.bias), nn.LayerNorm(C, bias=config.bias)
            self.attn = nn.ModuleDict({"c_attn": linear(C, 3 * C), "c_proj": linear(C, C, 0.02 / math.sqrt(2 * L))})
            self.mlp = nn.ModuleDict({"c_fc": linear(C, 4 * C), "c_proj": linear(4 * C, C, 0.02 / math.sqrt(2 * L))})

        def forward(self, x_BTC):
            B, T, _ = x_BTC.shape
            q, k, v = (t.view(B, T, config.n_head, -1).transpose(1, 2)
                       for t in self.attn["c_attn"](self.ln_1(x_BTC)).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p if self.training else 0.0)
            x_BTC = x_BTC + F.dropout(self.attn["c_proj"](y.transpose(1, 2).reshape(B, T, C)), p, self.training)
            h_BTC = self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x_BTC)), approximate="tanh"))
            return x_BTC + F.dropout(h_BTC, p, self.training)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(config.vocab_size, C), nn.Embedding(config.block_size, C)
            for table in (self.wte, self.wpe):
                nn.init.normal_(table.weight, std=0.02)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C, bias=config.bias)

        def forward(self, idx_BT):
            x_BTC = F.dropout(self.wte(idx_BT) + self.wpe(torch.arange(idx_BT.shape[1], device=idx_BT.device)),
                              p, self.training)
            for block in self.h:
                x_BTC = block(x_BTC)
            return self.ln_f(x_BTC) @ self.wte.weight.T  # weight tying

    return GPT()


class TorchTrain:
    """nanoGPT's training step in torch: micro-batch forward/backward, clip, AdamW. The model: nanoGPT's GPT
    (torch_gpt) for a model without biases, transformers' GPT-2 (SDPA) for one with them."""

    def __init__(self, cfg: BenchConfig, config: GPTConfig, micro_steps: int, rows: int, compiled: bool):
        torch, _ = self.torch, _ = torch_modules()
        self.name = ("torch.compile" if compiled else "torch eager") + (
            ", transformers GPT-2" if config.bias else ", nanoGPT's GPT")
        self.cfg, self.config, self.micro_steps, self.rows = cfg, config, micro_steps, rows
        self.device = torch_device(torch)
        torch.manual_seed(0)
        if config.bias:
            model = hf_model(config).to(self.device).train()
            self.forward = lambda x_BT: self.model(input_ids=x_BT, use_cache=False).logits
        else:
            model = torch_gpt(config).to(self.device).train()
            self.forward = lambda x_BT: self.model(x_BT)
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
                    logits = self.forward(x_BT)
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
