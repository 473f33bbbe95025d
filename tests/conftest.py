"""One torch thread for every test, and for the processes the tests start (they inherit it).

Why: a CPU recording holds the kernels' per-thread buffers (oneDNN's bf16 matmul blocks, torch's flash
attention blocks), so its exact figures follow the host's thread count: a tiny bf16 Llama's prefill held
50,176 B of matmul blocks at one thread and 99,968 at two, and the plans the tests compare with a recording
(made for a GPU, which holds no such blocks) hold on any host only at one count. Set before torch is imported.
vLLM's tests are left as they are: its CPU worker binds its own OpenMP threads (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:
    os.environ["OMP_NUM_THREADS"] = "1"
