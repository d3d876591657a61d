"""This machine's matmul peak: the best FP32 (or --dtype) FLOP/s of square torch.matmul over a few sizes.

    python benchmark/matmul_peak.py                  # prints e.g. "peak 1.32e+11 FLOP/s (fp32, 2 threads, n=2048)"
    python train_policy.py ... --peak_flops 1.32e11  # logs throughput/update_peak_fraction against it

On a GPU it measures the first device (use --dtype bfloat16 for tensor-core peak).
"""

import argparse
import time

import torch


def measure(n: int, dtype, device, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):  # warm-up
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="square matrix sizes to try")
    p.add_argument("--dtype", default="float32", help="torch dtype name (float32, bfloat16, ...)")
    p.add_argument("--seconds", type=float, default=1.0, help="timing window per size")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    best = (0.0, 0)
    for n in a.sizes:
        flops = measure(n, dtype, device, a.seconds)
        print(f"n={n:5d}: {flops:.3e} FLOP/s")
        best = max(best, (flops, n))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"peak {best[0]:.3e} FLOP/s ({a.dtype}, {where}, n={best[1]})")


if __name__ == "__main__":
    main()
