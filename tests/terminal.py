"""A command's standard error as a user at a terminal sees it: progress bars are drawn only there (tqdm
on a tty), never into a pipe or a file, so a test of them needs a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def stderr_on_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """(exit status, what `argv` wrote on its stderr, a 24 x 80 pseudo-terminal); stdout is a pipe."""
    leader, follower = pty.openpty()
    # 24 x 80: a new pseudo-terminal is 0 columns wide, and tqdm draws a bar of that width, nothing
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=follower, env=env, timeout=timeout)
    finally:
        os.close(follower)
    said = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed and everything has been read
            break
        if not chunk:
            break
        said += chunk
    os.close(leader)
    return done.returncode, said.decode("utf-8", "replace")
