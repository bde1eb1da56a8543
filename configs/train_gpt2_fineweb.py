# llm.c's GPT-2 (124M) recipe (scripts/run_gpt2_124M.sh) on FineWeb-Edu's 10B-token sample: 524,288 tokens
# per step, one epoch. llm.c's 124M runs reach a FineWeb val loss of about 3.28-3.29; the target here is a
# val loss <= 3.28. Not run at this scale here.
# First: nanogpt-jax prepare fineweb_edu  (pip install 'nanogpt-jax[hub]'; llm.c's shards load unchanged:
#        put edu_fineweb_{val,train}_*.bin in data/fineweb_edu/)
# Then:  nanogpt-jax train configs/train_gpt2_fineweb.py
out_dir = "out-gpt2-fineweb"
dataset = "fineweb_edu"

# llm.c: -b 64 -t 1024 -d 524288 (64 rows of 1024 per GPU, 8 GPUs). Here: one global batch of 8 x 64 rows
# = 524,288 tokens, whatever the number of devices; micro_batch_size=16 keeps one 80 GB accelerator's
# activations in memory (the update is the same: the step accumulates over the pieces). On a pod slice
# raise it (e.g. --micro_batch_size=64) so that each device gets more rows per pass.
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8
micro_batch_size = 16

# one epoch of 10B tokens: 10e9 / 524,288 = 19,073 steps (llm.c's run_gpt2_124M.sh ran 18,865: the
# token count of its FineWeb classic train shards); decayed over the whole run
max_iters = 19073
lr_decay_iters = 19073

# llm.c: -v 250 (val every 250 steps) over 20 batches per GPU x 8 GPUs of 64 x 1024 tokens
eval_interval = 250
eval_iters = 160
log_interval = 10

# GPT-2 124M as llm.c builds it: with biases, no dropout
n_layer = 12
n_head = 12
n_embd = 768
bias = True
dropout = 0.0

# llm.c: -l 0.0006 -u 700 -q 0.0 (cosine to 0) -c 0.1; AdamW betas 0.9/0.95, gradient clipping at 1.0
learning_rate = 6e-4
warmup_iters = 700
min_lr = 0.0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
