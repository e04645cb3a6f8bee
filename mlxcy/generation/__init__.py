"""Generation: from token ids to tokens, for one prompt or many.

api: the interface every backend implements (TextModel, GenerationOptions,
    Token, Metrics).
inference: mlxcy's own backend (MlxTextModel), the backend registry and
    load() (also mlxcy.load).
engine (compiled): the scheduler that advances every sequence one step at a
    time (chunked prefill, decode, speculative verification).
sample (compiled): samplers and logit processors.
batch (compiled): batch_generate and classify.
text_stream: token ids to text pieces, with stop strings.
cache_io: chat sessions' KV caches saved to and read from safetensors.
"""
