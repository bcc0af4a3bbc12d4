"""The MiniCPM4 training recipe at small scale: token shards, muP, WSD, checkpoints, DDP, SFT.

    shard_writer   text files -> token shards + index      token_loader  packed, seeded, resumable batches
    chat_data      chat JSONL -> masked, packed SFT rows   train_config  TrainConfig (checked before compute)
    mup            init and parameter groups by role        schedule      warmup-stable-decay
    trainer        the loop (train)                         checkpoint    atomic, resumable checkpoints
    metrics        metrics.jsonl and the progress bar       process_group torchrun, DDP / FSDP2 helpers
    linear_cross_entropy  chunked head + loss (fast path)   tunnel        muP proxy LR search, coordinate check
    mtp            multi-token-prediction heads (optional)  scaling_bench answer-only loss, accuracy, sigmoid fit
    length_buckets one document per row, similar lengths    longrope      LongRoPE factors for the long stage
"""
