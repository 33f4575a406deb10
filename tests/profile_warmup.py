"""Where a default warm-up step's time goes on this machine (a probe script, not collected by pytest).

    python tests/profile_warmup.py               # 2 threads: 20 timed steps, then torch.profiler over 10
    python tests/profile_warmup.py --threads 1   # the same at 1 thread

Random weights (speed does not depend on training), the default batch and warm-up mix. Prints the step's
median wall time, then the operators sorted by their own time under torch.profiler (which adds overhead
of its own: compare operators with each other, not with the unprofiled wall time).
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unigrpo  # noqa: E402
from bench import warmup_stepper  # noqa: E402


def main(threads=2, timed=20, profiled=10):
    torch.set_num_threads(threads)
    cfg = unigrpo.get_config([])
    _, step = warmup_stepper(cfg, "cpu", cfg.warmup_batch_size, n_mix=cfg.n_understanding, lr=1e-4)
    for _ in range(5):  # allocator growth and kernel selection
        step()
    ts = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"warm-up step, {threads} threads: median {ts[len(ts) // 2]:.3f} s, "
          f"p10-p90 {ts[len(ts) // 10]:.3f}-{ts[len(ts) * 9 // 10 - 1]:.3f} s ({timed} steps)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"operators' own time per step: {sum(e.self_cpu_time_total for e in prof.key_averages()) / profiled / 1e3:.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the pipeline's on 2 cores)")
    main(threads=ap.parse_args().threads)
