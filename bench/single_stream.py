"""The embedded model server's single stream: what each fast-path option is worth (issue 13).

One run, two parts; the options of each part are measured side by side in interleaved rounds (the
machine is shared, so ratios measured together say more than figures measured minutes apart):

1. **decode step**, in process: SmolLM2-135M-Instruct, one chat prompt (a different one each round),
   ``--tokens`` greedy tokens, the prefill not timed.  The previous path (bf16 weights, transformers'
   SDPA), the single-row decode attention alone (serving.attention), int8 weights (serving.quantize,
   which includes that attention: what --quantize int8 runs), int8 with a static KV cache (transformers'
   ``StaticCache``), int8 with a static cache under ``torch.compile`` (compile time reported), and a
   LoRA adapter (r=16 on all seven projections, as training makes them; random weights) run per row
   (peft's ``adapter_names``, the previous path), alone (serving.lora_routing), or merged into bf16
   weights (peft's ``merge_adapter``).  Medians over ``--rounds`` of decode tokens/s and of CPU time
   per token (all threads; less sensitive to other processes than wall time), ratios to the first row.
2. **end to end** over HTTP, as bench/serving_throughput.py measures it: ``python -m serving.server
   --quantize none`` (the default) and ``--quantize int8`` (opt-in), running side by
   side, at concurrency 1 (4 requests) and 16 (32 requests) of 64 tokens, ``--server-rounds`` rounds
   in turn; llama.cpp (llama-cpp-python) on the same GGUF file too when ``.bench-venvs/llamacpp``
   exists.  It is never built here (that compiles llama.cpp for minutes): without it the table quotes
   the figures recorded in docs/BENCHMARKS.md ("Embedded model server").

    .venv/bin/python bench/single_stream.py [--tokens 64] [--rounds 3] [--server-rounds 2]
                                            [--compile-mode default] [--skip-compile] [--skip-server]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serving_throughput import MODEL_NAME, PROMPTS, ROOT, Level, Server, free_port, gguf_path, run_level, warm_up

from store.config import OFFLINE_ENV, apply_runtime_env

# docs/BENCHMARKS.md, "Embedded model server (issue 3)": llama-cpp-python on the same GGUF, 2 threads.
RECORDED_LLAMACPP = {1: 78.5, 16: 63.7}
LORA_R = 16


def _load_avg() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- part 1: decode step
@dataclass
class Variant:
    label: str
    model: object  # what is called: a model, a PeftModel, or a compiled forward
    config: object
    static_cache: bool = False
    kwargs: dict = field(default_factory=dict)
    around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    runs: list[tuple[float, float]] = field(default_factory=list)  # (wall s, cpu s) per token
    tokens: list[list[int]] = field(default_factory=list)
    compile_s: float | None = None


def greedy_decode(v: Variant, prompt_ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """Greedy-decode ``n`` tokens after ``prompt_ids``; (wall s, cpu s) per decode step, and the tokens."""
    import torch
    from transformers import DynamicCache, LlamaForCausalLM, StaticCache

    from serving.kv_cache import cache_argument

    # From the class: a variant's model may be compiled or wrapped by peft, which hide forward's signature.
    cache_name = cache_argument(LlamaForCausalLM)

    ids = torch.tensor([prompt_ids])
    length = len(prompt_ids)
    if v.static_cache:
        cache = StaticCache(config=v.config, max_cache_len=length + n + 1)
    else:
        cache = DynamicCache(config=v.config)

    def step(input_ids, start: int):
        extra = {"cache_position": torch.arange(start, start + input_ids.shape[1])} if v.static_cache else {}
        positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        out = v.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                      **{cache_name: cache}, **extra, **v.kwargs)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode(), v.around():
        token = step(ids, 0)  # the prefill runs eagerly in every variant: not timed
        tokens = [int(token)]
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n - 1):
            token = step(token, length + i)
            tokens.append(int(token))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / (n - 1), cpu / (n - 1), tokens


def chat_prompt_ids(tokenizer) -> list[list[int]]:
    """`PROMPTS` as the engine encodes a chat (serving.engine.Engine.encode_chat)."""
    return [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in PROMPTS
    ]


def _variants(args) -> Iterator[Variant]:
    import torch
    from peft import LoraConfig, get_peft_model

    from serving.attention import NAME as DECODE_ATTENTION
    from serving.lora_routing import LoraRouting
    from serving.model import load_base_model
    from training.train import LORA_TARGETS

    def switch_attention(model, name):
        @contextlib.contextmanager
        def around():
            model.set_attn_implementation(name)
            try:
                yield
            finally:
                model.set_attn_implementation("sdpa")
        return around

    bf16 = load_base_model(quantize="none").model
    int8 = load_base_model(quantize="int8").model
    yield Variant("bf16, transformers SDPA (previous path)", bf16, bf16.config)
    yield Variant("bf16, decode attention", bf16, bf16.config, around=switch_attention(bf16, DECODE_ATTENTION))
    yield Variant("int8 + decode attention (--quantize int8)", int8, int8.config)
    yield Variant("int8, static KV cache", int8, int8.config, static_cache=True)
    if not args.skip_compile:
        mode = None if args.compile_mode == "default" else args.compile_mode
        yield Variant(f"int8, static KV cache, torch.compile ({args.compile_mode})",
                      torch.compile(int8.forward, mode=mode), int8.config, static_cache=True)

    lora = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=LORA_TARGETS, init_lora_weights=False)
    for quantize in ("none", "int8"):
        torch.manual_seed(0)  # the same adapter weights on both bases
        model = load_base_model(quantize=quantize).model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = get_peft_model(model, lora, adapter_name="lora").eval()
        base = "bf16" if quantize == "none" else "int8"
        yield Variant(f"{base} + LoRA, per row (adapter_names: previous path)", peft, model.config,
                      kwargs={"adapter_names": ["lora"]})

        @contextlib.contextmanager
        def routed(peft=peft):  # what the engine runs: serving.lora_routing's forward, every row on the adapter
            routing = LoraRouting()
            routing.install(peft)
            try:
                with routing.rows(["lora"]):
                    yield
            finally:
                routing.reset()

        yield Variant(f"{base} + LoRA, alone (serving.lora_routing{': --quantize int8' if base == 'int8' else ''})",
                      peft, model.config, around=routed)
        if quantize == "none":  # with int8 weights a merge would have to be re-rounded to int8

            @contextlib.contextmanager
            def merged(peft=peft):
                peft.merge_adapter()
                try:
                    yield
                finally:
                    peft.unmerge_adapter()

            yield Variant(f"{base} + LoRA, merged into the weights", peft, model.config, around=merged)


def decode_table(args) -> str:
    from transformers import AutoTokenizer

    from serving.model import resolve_base_model

    prompts = chat_prompt_ids(AutoTokenizer.from_pretrained(str(resolve_base_model())))
    variants = list(_variants(args))
    for v in variants:  # warm-up; compiles the compiled variant
        started = time.perf_counter()
        greedy_decode(v, prompts[0], 3)
        if "compile" in v.label:
            v.compile_s = time.perf_counter() - started
            print(f"# {v.label}: compiled in {v.compile_s:.0f} s", flush=True)
    for r in range(args.rounds):
        for v in variants:
            wall, cpu, tokens = greedy_decode(v, prompts[r % len(prompts)], args.tokens)
            v.runs.append((wall, cpu))
            v.tokens.append(tokens)
        print(f"# decode round {r + 1}/{args.rounds} done ({_load_avg()})", flush=True)

    first = variants[0]
    base_wall = statistics.median(w for w, _ in first.runs)
    base_cpu = statistics.median(c for _, c in first.runs)
    lines = [
        "| decode path | tokens/s | CPU ms/token | speed-up (wall) | speed-up (CPU) | same greedy tokens as row 1 "
        "| compile s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        wall = statistics.median(w for w, _ in v.runs)
        cpu = statistics.median(c for _, c in v.runs)
        pairs = zip(v.tokens, first.tokens, strict=True)
        same = sum(a == b for mine, ref in pairs for a, b in zip(mine, ref, strict=True))
        total = sum(len(t) for t in v.tokens)
        same_s = f"{same}/{total}" if "LoRA" not in v.label else "n/a"
        compile_s = f"{v.compile_s:.0f}" if v.compile_s is not None else ""
        lines.append(f"| {v.label} | {1 / wall:.1f} | {cpu * 1000:.1f} | {base_wall / wall:.2f}x | "
                     f"{base_cpu / cpu:.2f}x | {same_s} | {compile_s} |")
    lora_rows = [i for i, v in enumerate(variants) if "LoRA" in v.label]
    note = (f"\nLoRA rows: r={LORA_R} on all seven projections, random weights; compare them with each other "
            f"(row {lora_rows[0] + 1} is the previous path)." if lora_rows else "")
    del variants
    gc.collect()
    return "\n".join(lines) + note


# --------------------------------------------------------------------------- part 2: end to end
def _llamacpp_python(venv: Path) -> Path | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    probe = subprocess.run([str(py), "-c", "import llama_cpp.server, uvicorn"], capture_output=True)
    return py if probe.returncode == 0 else None


def server_table(args) -> str:
    subprocess.run(  # the converted model is cached before any server starts (one-off)
        [sys.executable, "-c", "from serving.model import resolve_base_model; resolve_base_model()"],
        cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, check=True,
    )
    servers: list[Server] = []
    for quantize in ("none", "int8"):
        port = free_port()
        servers.append(Server(
            f"abloop --quantize {quantize}" + (" (default)" if quantize == "none" else " (opt-in)"),
            [sys.executable, "-m", "serving.server", "--port", str(port), "--quantize", quantize,
             "--log-level", "warning"],
            port, args.log_dir / f"abloop-{quantize}.log",
        ))
    llama_py = _llamacpp_python(args.llamacpp_venv)
    if llama_py is not None:
        port = free_port()
        servers.append(Server(
            "llama.cpp (llama-cpp-python), same GGUF",
            [str(llama_py), "-m", "llama_cpp.server", "--model", str(gguf_path()), "--port", str(port),
             "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1), "--model_alias", MODEL_NAME],
            port, args.log_dir / "llamacpp.log",
        ))
    else:
        print(f"# no llama.cpp venv at {args.llamacpp_venv}: quoting its recorded figures", flush=True)

    results: dict[tuple[str, int], list[Level]] = {}
    with contextlib.ExitStack() as stack:
        for server in servers:
            print(f"# starting {server.label}: {shlex.join(server.cmd)}", flush=True)
            stack.enter_context(server)
            warm_up(server, 64)
        for r in range(args.server_rounds):
            for server in servers:
                for c in (1, 16):
                    level = asyncio.run(run_level(server, c, max(4, 2 * c), 64))
                    results.setdefault((server.label, c), []).append(level)
                    print(f"#   round {r + 1}, {server.label}, concurrency {c}: {level.tokens_per_s:.1f} tok/s "
                          f"({level.errors} errors; {_load_avg()})", flush=True)

    def tps(label: str, c: int) -> float:
        return statistics.median(lv.tokens_per_s for lv in results[(label, c)])

    previous = servers[0].label
    llama_label = servers[2].label if llama_py is not None else None
    lines = [
        "| server | concurrency | tokens/s (median of rounds) | p50 latency (s) | vs default "
        "| vs llama.cpp | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for server in servers:
        for c in (1, 16):
            levels = results[(server.label, c)]
            latencies = sorted(x for lv in levels for x in lv.latencies)
            p50 = latencies[len(latencies) // 2] if latencies else float("nan")
            llama = tps(llama_label, c) if llama_label else RECORDED_LLAMACPP[c]
            lines.append(
                f"| {server.label} | {c} | {tps(server.label, c):.1f} | {p50:.2f} | "
                f"{tps(server.label, c) / tps(previous, c):.2f}x | {tps(server.label, c) / llama:.2f}x | "
                f"{sum(lv.errors for lv in levels)} |"
            )
    if llama_label is None:
        lines.append(f"| llama.cpp, recorded (docs/BENCHMARKS.md, issue 3) | 1 / 16 | {RECORDED_LLAMACPP[1]} / "
                     f"{RECORDED_LLAMACPP[16]} | | | 1.00x | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per decode run")
    parser.add_argument("--rounds", type=int, default=3, help="decode rounds (each variant once per round)")
    parser.add_argument("--server-rounds", type=int, default=2)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, reduce-overhead, max-autotune-no-cudagraphs")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--llamacpp-venv", type=Path, default=ROOT / ".bench-venvs" / "llamacpp")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/abloop-bench-single-stream"))
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    apply_runtime_env()
    import torch

    exe = Path(sys.executable)
    exe_s = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)
    command = shlex.join([exe_s, "bench/single_stream.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    print(f"# {_load_avg()} at the start", flush=True)
    decode = decode_table(args)
    decode_load = _load_avg()
    server = None if args.skip_server else server_table(args)
    print()
    print(f"Command: `{command}`")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CPython {platform.python_version()}; "
          f"total {time.perf_counter() - started:.0f} s")
    print(f"\nDecode step, one row, {args.tokens} greedy tokens, medians of {args.rounds} rounds "
          f"({decode_load} after it):\n")
    print(decode)
    if server is not None:
        print(f"\nEnd to end over HTTP, 64 tokens per request, temperature 0, {args.server_rounds} rounds "
              f"({_load_avg()} after it):\n")
        print(server)


if __name__ == "__main__":
    main()
