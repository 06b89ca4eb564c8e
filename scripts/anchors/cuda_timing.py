"""Timing shared by the anchors in this folder: the median of CUDA-event times after a warm-up (the
convention of ../shared/anchors/attention.py, so our anchors and that one report alike)."""
import torch


def median_ms(fn, warm=3, iters=10):
    """fn() `warm` times untimed, then `iters` times, each between two CUDA events; the median, in ms."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]
