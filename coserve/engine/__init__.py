"""coserve's built-in inference engine (a file per concept, nano-vllm style):

types.py          requests in, outputs out (the contract with the server)
config.py         model configs as dataclasses, parsed from HF config.json
presets.py        named models: qwen3-30b-a3b (FP8), qwen3-embedding-8b, tiny-*, all-minilm-l6-v2
weights.py        HF safetensors (sharded, FP8 block-quantised) or random init -> LoadedModel
layers.py         linear (plain | FP8 block), norms; loading and random init
moe_weights.py    stacked expert weights (plain | FP8 block)
weight_windows.py the window of a full checkpoint tensor a tensor-parallel rank holds
models/           qwen3.py (dense + MoE decoder, also the embedding model), bert.py
attention.py      AttnMetadata + the layer that picks dense / paged-prefill / paged-decode
kernels/          plain-torch references, one per concept; GPU twins replace them
kv_cache.py       paged KV cache tensor + block manager
sequence.py       a generation request's state
scheduler.py      continuous batching, chunked prefill, admission by blocks, preemption
steps.py          a model step in host form (static buckets, varlen) and its host staging
runner.py         batch -> model inputs (static-shape decode buckets) -> logits
ranks.py          what every rank builds: model shard, KV cache, runner (gen); model (embed)
sampler.py        greedy / temperature / top-p with per-request seeds
memory.py         KV budget from gpu_memory_utilization (GPU) or bytes (CPU)
gen_engine.py     GenEngine: add_request / step / abort / stats / generate
embed_engine.py   EmbedEngine: dynamic batching of embedding requests
parallel.py       tensor parallelism: this process's rank, weight windows, collectives
tp_workers.py     the processes of ranks 1..N-1, started and stopped by rank 0's engine
messages.py       typed messages: server front <-> engine core, rank 0 -> other ranks
"""
