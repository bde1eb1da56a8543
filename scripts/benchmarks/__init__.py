"""The benchmarks of nanogpt-jax, outside the package: the training step and `generate`, timed after
compilation; with `--compare=torch`, the same shape in PyTorch in the same process, timed round by round
alternately with ours, so that a busy machine slows both sides alike and the ratio holds.

`python scripts/bench_case.py [CONFIG.py] [--shape=baby|char|gpt2|gpt2-xl] [--compare=torch] [--key=value ...]`
measures one case and prints one JSON line; `python scripts/bench.py` prints the table.

How each side is timed:
- train, ours (ours.py): as `train` runs it: the same Run (synthetic tokens, batching, sharding, jitted
  step), the next batch read while a step runs, at most two steps in flight; ms/iter = wall time of `steps`
  steps / `steps`, the median over rounds. The step is compiled ahead of time, and that executable is what
  runs (so its cost_analysis() FLOPs are the FLOPs timed).
- train, torch (reference.py): the same model in torch, biases as ours has them: nanoGPT's GPT written in
  torch (torch_gpt) without biases, transformers' GPT2LMHeadModel (SDPA attention) with them; torch.optim.AdamW with the same lr, betas, weight decay (matrices only) and clipping, the same
  micro-batches (rows and accumulation steps as ours lays them out), batches read from the same kind of
  synthetic tokens inside the timed loop as nanoGPT's get_batch. Eager on a CPU; on a GPU bf16 autocast,
  eager and torch.compile both, and the faster counts.
- generate: one call per repeat, tokens/s = rows x new tokens / wall time (prompt included). The
  comparison is greedy: ours (`generate`, temperature 0) against transformers' `generate` on the same
  weights (ours copied into the HF model), eager with its dynamic KV cache and, with `--torch_compile`,
  compiled with a static cache (the faster counts); each says whether its tokens equal ours.
Peak memory (probes.py): on a CPU, both libraries allocate from one process heap, so each side runs again in
a fresh process (`--side=ours|torch`, 2 steps) that reports its peak RSS minus its RSS before the model is
built (imports and runtime start excluded); on a GPU, each library's own peak device allocation.
"""
