# nanoGPT's config/eval_gpt2.py: evaluate the released gpt2 on OpenWebText.
# 124M parameters; n_layer=12, n_head=12, n_embd=768.
#   nanogpt-jax eval configs/eval_gpt2.py
#   nanogpt-jax train configs/eval_gpt2.py   (as nanoGPT runs it: eval_only)
# Needs data/openwebtext/val.bin in nanoGPT's format (train also reads train.bin), e.g. from nanoGPT's
# data/openwebtext/prepare.py.
# nanoGPT's published OpenWebText val losses: gpt2 3.12, gpt2-medium 2.84, gpt2-large 2.67, gpt2-xl 2.54.
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
init_from = "gpt2"
dataset = "openwebtext"
