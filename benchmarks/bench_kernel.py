"""One int4 projection's matmul by number of rows, in process, one thread: the packed bf16 kernel on
AMX's tiles, the same kernel on the vector units, and the float32 path's int8 rows (timed with
their quantizing) on the vector units (`qgemm_i8.h`) and on AMX's integer tiles
(`qgemm_i8_amx.h`, from 2 rows). What docs/engine.md's table of the tiles against int8
rows comes from; the units are interleaved `--rounds` times and each figure is microseconds a call.

    .venv/bin/python benchmarks/bench_kernel.py --rounds 4
"""

from __future__ import annotations

import argparse
import time

import torch

from fundament.models import native
from fundament.models.device import cpu_flags, cpu_name
from fundament.models.llama.linear import PACK_INT4, PACK_INT8X, pack_weight

SHAPES = ((1536, 576), (576, 1536))  # SmolLM2-135M's gate/up and down projections: (out, in)


def time_call(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", default="1,2,4,6,16,64")
    args = ap.parse_args()
    if not native.load():
        raise SystemExit("the native kernel did not build here (models/native.py)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    op, none = torch.ops.fundament, torch.empty(0)
    amx = "amx_bf16" in cpu_flags()
    print(f"cpu: {cpu_name()}; amx {'yes' if amx else 'no'}; one thread")
    tiles_of = {False: amx, True: "amx_int8" in cpu_flags()}  # bf16 tiles, int8 tiles
    units = [("tiles", 1, False), ("vector bf16", 0, False), ("int8 rows", 0, True), ("int8 tiles", 1, True)]
    units = [u for u in units if (u[1] == 0 or tiles_of[u[2]]) and (u[2] or op.qgemm_available())]
    times: dict[tuple, list[float]] = {}
    for n, k in SHAPES:
        levels = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scale = (torch.rand(n, k // 32) * 0.01).half().float()
        lo = (torch.randn(n, k // 32) * 0.05).half().float()
        packed = pack_weight(PACK_INT4, levels, scale, lo)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k).bfloat16()  # (rows, k)
            for _ in range(args.rounds):
                for name, tiles, int8 in units:
                    op.qgemm_amx(tiles)
                    xin, kind = (x.float(), PACK_INT4 + PACK_INT8X) if int8 else (x, PACK_INT4)
                    us = time_call(lambda: op.qgemm(xin, kind, packed, none, none, False), max(20, 400 // rows))  # noqa: B023 (called here)
                    times.setdefault((n, k, rows, name), []).append(us)
    op.qgemm_amx(int(amx))
    for (n, k, rows, name), v in times.items():
        print(f"{n:5d} x {k:<5d} rows {rows:3d}  {name:12s} {min(v):7.0f}-{max(v):.0f} us")


if __name__ == "__main__":
    main()
