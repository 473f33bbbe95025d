"""Takes `tb_plugin_screenshot.png`: TensorBoard's KV Cache tab on this folder's sample runs.

    python sample_traces/tb_screenshot.py          # ~20 s; needs tensorboard and chromium

Starts `tensorboard --logdir sample_traces/` on 127.0.0.1 (the PyTorch Profiler tab sits next to the KV
Cache one, both reading the same runs), opens `/#kvcache` in headless Chromium with every other host
unresolvable, and saves the screenshot here. The server is always stopped.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "tb_plugin_screenshot.png"
STARTUP_LIMIT_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(proc: subprocess.Popen[bytes], base: str) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("tensorboard exited before serving")
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/kvcache/runs", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"tensorboard did not answer within {STARTUP_LIMIT_S:.0f}s")


def main() -> int:
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium is not installed", file=sys.stderr)
        return 1
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    exe = shutil.which("tensorboard")
    command = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        [*command, "--logdir", str(HERE), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_up(proc, base)
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--window-size=1500,1250",
                "--virtual-time-budget=15000",
                f"--screenshot={OUT}",
                f"{base}/#kvcache",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(  # `--help` says what this does, before it does it
        prog="tb_screenshot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    sys.exit(main())
