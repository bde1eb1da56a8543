# nanoGPT's config/train_gpt2.py: GPT-2 (124M) on OpenWebText, nanoGPT's numbers. nanoGPT reaches a val loss
# of about 2.85 with it (8 x A100 40GB, ~5 days). Not run at this scale here.
# First: nanogpt-jax prepare openwebtext  (pip install 'nanogpt-jax[hub]'; ~54 GB of hub cache, 9B tokens)
# Then:  nanogpt-jax train configs/train_gpt2.py   (one accelerator or a pod slice: the layout line shows
#        how the rows of each step are split over the devices)
out_dir = "out-gpt2"
dataset = "openwebtext"

# nanoGPT logs this run to W&B (wandb_log = True); set it to log here too (pip install 'nanogpt-jax[wandb]')
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 batch size * 1024 block size * 40 accumulation steps = 491,520 tokens per step (~0.5M): nanoGPT's
# 5 steps x 8 GPUs, here one global batch whatever the number of devices
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 steps: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

# GPT-2 124M without biases (nanoGPT's train.py defaults, written out)
n_layer = 12
n_head = 12
n_embd = 768
bias = False
dropout = 0.0

# AdamW and the schedule
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
