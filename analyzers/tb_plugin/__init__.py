"""kvtrace's TensorBoard plugin: a "KV Cache" tab for the kvtrace runs under `tensorboard --logdir`.

Imported by TensorBoard through the `tensorboard_plugins` entry point; nothing here is needed to record or
analyse a run, and nothing here imports torch.
"""

from __future__ import annotations

__all__: list[str] = []
