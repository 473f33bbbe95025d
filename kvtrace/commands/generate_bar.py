"""The progress bar `kvtrace demo` draws on stderr while generate() runs: the demo's default run decodes for
a minute on a CPU, which was a minute of silence. tqdm, fed by a transformers streamer, on a terminal only
and never under -q, as the reading commands draw theirs (`kvtrace.commands.progress`)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["generate_bar"]


def generate_bar(new_tokens: int, beams: int, quiet: bool) -> Any | None:
    """A streamer to pass as generate(streamer=...) that draws a bar over the `new_tokens` decoding steps,
    or None: off a terminal, under -q, and for beam search, which refuses a streamer. None also keeps a
    recording in a file or a pipe as it was: no streamer is passed there. On a CPU the streamer allocates
    nothing (generate() hands it `tokens.cpu()`, the same tensor); on a GPU that host copy is the CPU's."""
    if quiet or beams > 1 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    from transformers.generation.streamers import BaseStreamer

    class _StepBar(BaseStreamer):  # type: ignore[misc]
        """One tick a decoding step. generate() puts the prompt first, which is no step."""

        def __init__(self) -> None:
            self.bar = tqdm(total=new_tokens, desc="generate", unit="step", file=sys.stderr)
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.bar.update(1)
            self.prompt_seen = True

        def end(self) -> None:
            self.close()

        def close(self) -> None:
            """Ends the bar's line; also where generate() raised before end() (an OOM, a Ctrl-C), so
            that the error is a line of its own. Closing twice is nothing."""
            self.bar.close()

    return _StepBar()
