"""The embedded OpenAI-compatible model server (transformers + peft), speaking vLLM's LoRA adapter API.

Entry points (import them from their modules; importing ``serving`` itself stays light):

* ``serving.server.run(model="default", host="127.0.0.1", port=8001, adapters=None)`` - ``abloop serve-model``
* ``serving.server.ServerThread`` - the server in-process on a free loopback port (``.base_url``)
* ``serving.app.create_app(engine=None, *, model="default", adapters=None, max_batch=16, max_queue=256,
  quantize="none", compile=False)``
* ``serving.model.resolve_base_model(model="default") -> Path`` - a local HF dir (converts the GGUF once)
* ``serving.model.load_base_model(model="default", device=None, dtype="auto", quantize="none")``
* ``serving.engine.Engine`` - the batching generation engine (scheduler, model runner, adapter manager)

The single stream's fast path (docs/BENCHMARKS.md, "Single stream (issue 13)"): int8 weights for decode
steps of a few rows (:mod:`serving.quantize`) with single-row attention kept on SDPA's fast path
(:mod:`serving.attention`), and LoRA without peft's per-row split: each row on its own adapter through
a 0/1 row mask (:mod:`serving.lora_routing`). Every batch's KV cache grows in place rather than by
concatenation (:mod:`serving.kv_cache`; "KV cache with room to grow").
"""
