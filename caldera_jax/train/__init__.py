"""Training machinery shared by every job that trains something on top of a frozen model
(compressor training, fine-tuning after decomposition, distillation):

    optim.py       AdamW with warm-up + cosine schedule and global-norm clipping (optax)
    accumulate.py  gradient accumulation over micro-batches, normalised by the tokens the step
                   really holds (a final partial step is not under-weighted)
    loop.py        the loop: jitted steps over a dp mesh, validation, best tracking, orbax
                   checkpoints (params, optimizer state, data position, RNG seed), resume after
                   kill -9 with identical results, metrics JSONL, PNG curves, progress bar
"""
