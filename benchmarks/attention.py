"""Benchmark attention implementations (forward+backward) on the current JAX backend.

Compares ``dot_product_attention(implementation='xla')`` with ``'blockwise'`` at several tile
sizes, with ``'pallas_tpu'`` (the splash kernel; TPU only) under ``--pallas-tpu``, and with
``torch.nn.functional.scaled_dot_product_attention`` when torch is importable.
Each configuration runs in its own subprocess so that its peak RSS is clean (the parent never
initialises JAX: on TPU it would hold the chips the workers need).  Reported:

* time   -- best wall time of ``--repeats`` calls of ``jit(grad(sum(attention(q, k, v))))``
            (w.r.t. q, k, v), after AOT compilation;
* cpu    -- best process CPU time (all threads) of those calls; less sensitive than wall time
            to other load on a shared machine;
* temp   -- XLA ``compiled.memory_analysis().temp_size_in_bytes`` (scratch buffers);
* rss    -- peak resident memory of the worker process (includes inputs and the runtime);
* ratios against the 'xla' row measured in the same run.

Default (BrainLM decoder shape B=8, L=4241, H=4, D=64, fp32) takes ~1-2 min on 2 CPU cores::

    python benchmarks/attention.py
    python benchmarks/attention.py --blocks 256x512,512x1024,512x2048,1024x1024 --repeats 3
    python benchmarks/attention.py --batch 1 --seq 2048 --dtype bfloat16 --mode fwd
    python benchmarks/attention.py --dtype bfloat16 --heads 16 --dim 32 --pallas-tpu  # on a TPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_DEFAULT_BLOCKS = "512x1024,512x2048,512x4096"


def _worker(args: argparse.Namespace, impl: str, block_q: int, block_k: int) -> dict:
    """Runs one configuration in this process; returns a result row."""
    shape = (args.batch, args.seq, args.heads, args.dim)
    if impl == "torch":
        import torch  # pylint: disable=import-outside-toplevel

        dtype = getattr(torch, args.dtype)
        q, k, v = (torch.randn(shape, dtype=dtype).transpose(1, 2).requires_grad_(args.mode == "fwdbwd")
                   for _ in range(3))

        def call():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if args.mode == "fwdbwd":
                out.sum().backward()

        temp = None
        call()  # warm-up
    else:
        import jax  # pylint: disable=import-outside-toplevel
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from brainlm_jax.models.attention import dot_product_attention  # pylint: disable=import-outside-toplevel

        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.dtype(args.dtype)) for key in keys)

        def attn(q, k, v):
            return dot_product_attention(q, k, v, implementation=impl, block_q=block_q, block_k=block_k)

        fn = attn if args.mode == "fwd" else jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(),
                                                      argnums=(0, 1, 2))
        compiled = jax.jit(fn).lower(q, k, v).compile()
        mem = compiled.memory_analysis()
        temp = None if mem is None else mem.temp_size_in_bytes

        def call():
            jax.block_until_ready(compiled(q, k, v))

    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from brainlm_jax.tools import measure  # pylint: disable=import-outside-toplevel
    rss = int(measure.maxrss_mib() * 2**20)  # VmHWM: ru_maxrss would include the parent's RSS
    backend = None if impl == "torch" else f"{jax.default_backend()} x{jax.device_count()}"
    return {"impl": impl, "backend": backend, "block_q": block_q, "block_k": block_k,
            "time_s": min(times),
            "cpu_s": min(cpu_times),
            "temp_bytes": temp, "rss_bytes": rss}


def _run_subprocess(argv: list[str], impl: str, block_q: int, block_k: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", f"{impl}:{block_q}:{block_k}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"[{impl} {block_q}x{block_k}] failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:9.1f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:6.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4241, help="424 parcels x 10 patches + CLS")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", choices=("fwdbwd", "fwd"), default="fwdbwd")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per config (best is reported)")
    parser.add_argument("--blocks", default=_DEFAULT_BLOCKS, help="comma list of block_q x block_k")
    parser.add_argument("--no-xla", action="store_true", help="skip the (memory-hungry) 'xla' baseline")
    parser.add_argument("--pallas-tpu", action="store_true", help="add 'pallas_tpu' (TPU only)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:  # pylint: disable=protected-access
        impl, bq, bk = args._worker.split(":")  # pylint: disable=protected-access
        print(json.dumps(_worker(args, impl, int(bq), int(bk))))
        return

    raw = sys.argv[1:] if argv is None else argv
    configs = [] if args.no_xla else [("xla", 0, 0)]
    for spec in filter(None, args.blocks.split(",")):
        bq, bk = spec.lower().split("x")
        configs.append(("blockwise", int(bq), int(bk)))
    if args.pallas_tpu:
        configs.append(("pallas_tpu", 0, 0))
    try:
        import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        configs.append(("torch", 0, 0))
    except ImportError:
        pass

    rows = [r for r in (_run_subprocess(raw, *c) for c in configs) if r is not None]
    backend = next((r["backend"] for r in rows if r.get("backend")), "n/a")
    print(f"backend={backend} cpus={os.cpu_count()} "
          f"shape=B{args.batch} L{args.seq} H{args.heads} D{args.dim} {args.dtype} mode={args.mode} "
          f"repeats={args.repeats}")
    ref = next((r for r in rows if r["impl"] == "xla"), None)
    header = (f"{'impl':<10} {'block_q':>7} {'block_k':>7} {'time_s':>8} {'cpu_s':>8} {'temp_MiB':>9} {'rss_MiB':>9} "
              f"{'time/xla':>8} {'cpu/xla':>8} {'temp/xla':>8} {'rss/xla':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        blocks = ("-", "-") if r["impl"] != "blockwise" else (r["block_q"], r["block_k"])
        print(f"{r['impl']:<10} {blocks[0]:>7} {blocks[1]:>7} {r['time_s']:8.2f} {r['cpu_s']:8.2f} {_fmt_mib(r['temp_bytes'])} "
              f"{_fmt_mib(r['rss_bytes'])} "
              f"{_ratio(r['time_s'], ref and ref['time_s']):>8} "
              f"{_ratio(r['cpu_s'], ref and ref['cpu_s']):>8} "
              f"{_ratio(r['temp_bytes'], ref and ref['temp_bytes']):>8} "
              f"{_ratio(r['rss_bytes'], ref and ref['rss_bytes']):>8}")


if __name__ == "__main__":
    main()
