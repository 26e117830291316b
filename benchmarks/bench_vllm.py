"""fundament's engine against vLLM's CPU engine on the same weights, and what fundament in front of
that vLLM (a model with `vllm: {}`: the proxy) costs, the three interleaved in one run:

  (a) `fundament serve`, its own engine          (b) the vLLM server itself, at its own URL
  (c) `fundament serve --config` with `vllm: {}`, whose supervised vLLM server is (b)

At each concurrency level: aggregate tokens/s and p50/p95 time to first token of C streaming chat
requests (bench_engine's `load`), ours/vLLM (a/b), and the proxy's throughput c/b and overhead.
Each server has a scratch $FUNDAMENT_HOME and this one's $FUNDAMENT_CACHE: no second dequantization. Not a
test. Run it on an idle machine: every engine here spreads OpenMP threads over all cores, and one
busy process beside them slows decode tenfold. vLLM's environment is built by scripts/vllm_env.sh. Run:

    .venv/bin/python benchmarks/bench_vllm.py --vllm-threads 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
import yaml
from bench_engine import load, peak_rss_mb, start_ours, stop, warm_up

from fundament.config import DEFAULT_MODELS, VLLMSpec, fundament_cache
from fundament.engine.vllm_server import vllm_python

MODEL = DEFAULT_MODELS[0].name  # vLLM serves it under the same name
SYSTEMS = ("fundament", "vllm", "proxy")
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
QUIET_S = 2.0  # between two measured loads
_runs = iter(range(10_000))  # every measured load gets prompts of its own (below)


def vllm_env(threads: int) -> dict[str, str]:
    """1: vLLM's defaults (on a 2-core machine its OpenMP threads run on core 0, core 1 is kept
    for its scheduler process). N > 1: its threads on the first N cores this process may use.
    OMP_NUM_THREADS alone changes nothing: vLLM's worker sets it from its binding
    (vllm/utils/ompmultiprocessing.py)."""
    if threads == 1:
        return {}
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))}


def vllm_version() -> str:
    code = (
        "import importlib.metadata as m\ntry: print(m.version('vllm-cpu'))\nexcept Exception: print(m.version('vllm'))"
    )
    out = subprocess.run([vllm_python(VLLMSpec()), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def new_home(homes: list[Path]) -> str:
    home = Path(tempfile.mkdtemp(prefix="fundament-bench-vllm-"))
    homes.append(home)
    return str(home)


def proxy_config(home: str, threads: int) -> str:
    m = DEFAULT_MODELS[0]
    model = {"name": m.name, "package": m.package, "file": m.file, "sampling": asdict(m.sampling)}
    model["vllm"] = {"env": vllm_env(threads)}
    path = Path(home) / "vllm.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return str(path)


def wait_vllm(root: str, proc: subprocess.Popen, seen: list[int], timeout: float = 900) -> dict:
    """The proxy's /health entry for MODEL once its vLLM server is ready; vLLM's pid goes to `seen`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fundament serve --config exited with {proc.returncode}")
        engine = httpx.get(f"{root}/health", timeout=5).json()["engines"][MODEL]
        if engine.get("pid") and engine["pid"] not in seen:
            seen.append(engine["pid"])
        if engine.get("state") == "ready":
            return engine
        time.sleep(1)
    raise RuntimeError(f"vLLM behind {root} not ready after {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def affinity(pid: int) -> dict[str, int]:
    """How many threads of each process under `pid` may run on which CPUs: shows vLLM's binding."""
    seen: Counter[str] = Counter()
    for p in [pid, *descendants(pid)]:
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            for task in Path(f"/proc/{p}/task").glob("*"):
                cpus = re.search(r"Cpus_allowed_list:\s*(\S+)", (task / "status").read_text())[1]
                seen[f"{comm} cpus {cpus}"] += 1
        except OSError:
            continue
    return dict(seen)


def binding(log: str) -> list[str]:
    """vLLM's own account of its OpenMP binding (`core ids=[...]`, `reserved_cpus=[...]`)."""
    text = Path(log).read_text(errors="replace")
    return re.findall(r"local_rank=\d+, core ids=\[[^\]]*\]|reserved_cpus=\[[^\]]*\]", text)


def stop_tree(proc: subprocess.Popen, extra: list[int]) -> None:
    """Stop a server and everything it started: fundament stops its vLLM and worker itself;
    whatever outlives it 15 s is killed, by pid."""
    pids = descendants(proc.pid) + [p for pid in extra for p in (pid, *descendants(pid))]
    try:
        stop(proc)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.time() + 15
    while (alive := [p for p in set(pids) if Path(f"/proc/{p}").exists()]) and time.time() < deadline:
        time.sleep(0.5)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check_length(base: str, max_tokens: int) -> int:
    """tokens/s counts max_tokens per request: each server must honour ignore_eos. Returns the
    prompt's length, which shows whether vLLM's chat template renders what fundament's does."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens}
    body.update(temperature=0, ignore_eos=True)
    r = httpx.post(f"{base}/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    if (got := r.json()["usage"]["completion_tokens"]) != max_tokens:
        raise RuntimeError(f"{base} generated {got} tokens, not {max_tokens}, with ignore_eos")
    return r.json()["usage"]["prompt_tokens"]


def prompts(c: int) -> list[str]:
    # New prompts for every load: vLLM's prefix cache must not serve (c) what (b) just computed.
    # Zero-padded numbers keep every prompt the same number of tokens.
    k = next(_runs)
    return [f"Write a short story about a robot number {i:03d} of batch {k:04d}." for i in range(c)]


def measure(urls: dict[str, str], c: int, max_tokens: int, reps: int) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in urls}
    for url in urls.values():  # a short round at this concurrency first: its batch shapes are new
        asyncio.run(load(url, MODEL, c, 8, prompts(c)))
    for r in range(reps):
        order = list(urls)[r % len(urls) :] + list(urls)[: r % len(urls)]  # no system always goes first
        for s in order:
            # vLLM's worker spins on its queue for 1 s after its last step (shm_broadcast busy_loop_s);
            # the next load must not share the cores with that.
            time.sleep(QUIET_S)
            runs[s].append(asyncio.run(load(urls[s], MODEL, c, max_tokens, prompts(c))))
    out: dict = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} | {"reps": v} for s, v in runs.items()}
    a, b, p = (out[s]["tokens_per_s"] for s in SYSTEMS)
    out["ours_over_vllm"] = a / b
    out["proxy_over_vllm"] = p / b
    out["proxy_overhead_pct"] = (1 - p / b) * 100
    out["proxy_ttft_p50_added_s"] = out["proxy"]["ttft_p50"] - out["vllm"]["ttft_p50"]
    return out


def table(results: dict) -> str:
    rows = [
        "| vLLM threads | C | fundament tok/s | vLLM tok/s | proxy tok/s | fundament/vLLM | proxy/vLLM "
        "| proxy overhead | TTFT p50 f / v / p (s) | TTFT p95 f / v / p (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, setting in results.items():
        for c, m in setting["levels"].items():
            tps = " | ".join(f"{m[s]['tokens_per_s']:.1f}" for s in SYSTEMS)
            p50 = " / ".join(f"{m[s]['ttft_p50']:.2f}" for s in SYSTEMS)
            p95 = " / ".join(f"{m[s]['ttft_p95']:.2f}" for s in SYSTEMS)
            rows.append(
                f"| {threads} | {c} | {tps} | {m['ours_over_vllm']:.2f}x | {m['proxy_over_vllm']:.2f}x "
                f"| {m['proxy_overhead_pct']:.1f}% | {p50} | {p95} |"
            )
    return "\n".join(rows)


def vllm_setting(threads: int, ours_url: str, ours_prompt: int, args, homes: list[Path], running: dict) -> dict:
    """Start the proxy and its vLLM with `threads`, measure the three at every level, stop the two."""
    home = new_home(homes)
    proxy, proxy_url = start_ours(home, proxy_config(home, threads))
    running[proxy.pid] = (proxy, vllm_pids := [])
    t = time.time()
    engine = wait_vllm(proxy_url.removesuffix("/v1"), proxy, vllm_pids)
    urls = {"fundament": ours_url, "vllm": engine["url"].rstrip("/") + "/v1", "proxy": proxy_url}
    setting = {"env": vllm_env(threads), "vllm_ready_s": time.time() - t, "binding": binding(engine["log"])}
    setting["prompt_tokens"] = {"fundament": ours_prompt}
    for s in ("vllm", "proxy"):
        warm_up(urls[s], MODEL, [])
        setting["prompt_tokens"][s] = check_length(urls[s], args.max_tokens)
    setting["threads_allowed_cpus"] = affinity(engine["pid"])
    print(f"vLLM threads {threads}: env {setting['env']}, ready after {setting['vllm_ready_s']:.0f} s")
    print(f"  binding (vLLM's log): {'; '.join(setting['binding'])}")
    print(f"  threads on CPUs     : {setting['threads_allowed_cpus']}")
    print(f"  prompt tokens of one chat message: {setting['prompt_tokens']}", flush=True)
    setting["levels"] = {}
    for c in [int(x) for x in args.levels.split(",")]:
        m = setting["levels"][c] = measure(urls, c, args.max_tokens, args.reps)
        each = "  ".join(f"{s} {m[s]['tokens_per_s']:7.1f} tok/s ttft p50 {m[s]['ttft_p50']:.2f}s" for s in SYSTEMS)
        print(
            f"  C={c:<3d} {each}  ours/vLLM {m['ours_over_vllm']:.2f}x  proxy {m['proxy_over_vllm']:.2f}x", flush=True
        )
    vllm_tree = [engine["pid"], *descendants(engine["pid"])]
    setting["peak_rss_mb"] = {
        "vllm (all its processes)": sum(peak_rss_mb(p) for p in vllm_tree),
        "proxy": peak_rss_mb(proxy.pid),
    }
    stop_tree(proxy, vllm_pids)
    del running[proxy.pid]
    return setting


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,16,64", help="concurrent streaming requests, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--vllm-threads",
        default="2",
        help="1: vLLM's defaults (one core kept for its scheduler); 2: two cores; '1,2' measures both",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm.json"))
    args = ap.parse_args()
    os.environ["FUNDAMENT_CACHE"] = str(fundament_cache())  # every server's
    flags = set(Path("/proc/cpuinfo").read_text().split())
    cpu = {f: f in flags for f in CPU_FLAGS}
    version = vllm_version()
    print(f"machine: {os.cpu_count()} cores; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu.items()))
    print(f"vLLM   : {version} ({vllm_python(VLLMSpec())}); model {MODEL}", flush=True)

    homes: list[Path] = []
    running: dict[int, tuple[subprocess.Popen, list[int]]] = {}  # pid: (server, its vLLM pids)
    results: dict = {}
    try:
        ours, ours_url = start_ours(new_home(homes))
        running[ours.pid] = (ours, [])
        warm_up(ours_url, MODEL, [])
        ours_prompt = check_length(ours_url, args.max_tokens)
        for threads in [int(x) for x in args.vllm_threads.split(",")]:
            results[threads] = vllm_setting(threads, ours_url, ours_prompt, args, homes, running)
        for setting in results.values():
            setting["peak_rss_mb"]["fundament"] = peak_rss_mb(ours.pid)
    except BaseException:
        print("failed; the servers' homes (logs/vllm-*.log) are kept: " + " ".join(map(str, homes)), flush=True)
        raise
    finally:
        for proc, extra in running.values():
            stop_tree(proc, extra)

    print("\n" + table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "cpu_flags": cpu, "vllm": version}
    run |= {"model": MODEL, "max_tokens": args.max_tokens, "reps": args.reps, "settings": results}
    out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"\nwritten {out}")
    for home in homes:  # only after a run that finished: a failed one leaves its logs
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
