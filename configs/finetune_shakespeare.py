# nanoGPT's config/finetune_shakespeare.py: finetune the released GPT-2 XL on Tiny Shakespeare (GPT-2 BPE).
# Prepare first: nanogpt-jax prepare shakespeare
# Memory: gpt2-xl has 1.56B parameters: float32 params 6.2 GB + AdamW moments 12.5 GB + gradients 6.2 GB
# (+ the micro-batch gradient accumulator, another 6.2 GB) + activations: ~31 GB before activations, so one
# 40 GB GPU is tight and 80 GB is comfortable. On less memory start from a smaller model
# (--init_from=gpt2-medium or gpt2) and/or add --remat=True to recompute activations in the backward pass.
out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
dataset = "shakespeare"
init_from = "gpt2-xl"  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
