# The lecture's bigram model ("Let's build GPT": the first step before attention) on Tiny Shakespeare characters.
out_dir = "out-bigram-shakespeare-char"
model = "bigram"
dataset = "shakespeare_char"
eval_interval = 300
eval_iters = 200
log_interval = 100
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32
block_size = 8

learning_rate = 1e-2
max_iters = 3000
decay_lr = False
weight_decay = 0.0
grad_clip = 0.0
