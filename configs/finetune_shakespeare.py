# nanoGPT's config/finetune_shakespeare.py: finetune the released GPT-2 XL on Tiny Shakespeare (GPT-2 BPE).
# Prepare first: nanogpt-jax prepare shakespeare
# Memory: gpt2-xl has 1.56B parameters: float32 params 6.2 GB + AdamW moments 12.5 GB + gradients 6.2 GB
# (+ the micro-batch gradient accumulator, another 6.2 GB) + activations on one device: ~31 GB before
# activations, so one 40 GB GPU is tight and 80 GB is comfortable. Sharded over 8 TPU chips (--fsdp=8)
# each holds an eighth of the state and one layer's weights at a time; each block keeps only its input for
# the backward pass (remat="full"), so a v5e-8 chip peaks at 6.2 of its 16 GiB (`nanogpt-jax compile
# configs/finetune_shakespeare.py --topology=v5e:2x4 --fsdp=8`). Where memory is plentiful, --remat=none is
# faster (it recomputes nothing).
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
remat = "full"

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
