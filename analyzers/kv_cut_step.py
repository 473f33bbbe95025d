"""The last step of a run that never ended, or whose block raised, told from its KV log: which layers of
it the log holds, so that the figures of the end are those of the last whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

from analyzers.kv_events import holds_tokens
from kvtrace.format import KvEvent


@dataclass(frozen=True)
class CutStep:
    """The last step of a run that never ended, cut between its layers' updates: the log holds some of
    them (the process was killed, or the writer had not flushed the rest yet). The figures of the end come
    from the step before it, the last whole one; the memory timeline still shows what of it was logged.

    Or, `raised`, the last step of a block that raised inside the model's forward (an OOM, a Ctrl-C): the
    step yielded no token and never ended, but the log holds all it did, so the end stays the moment it
    raised (the KV held then, its layers' tokens); only what a whole step means leaves it out (generated
    tokens, the step count, the tokens held at a step's end)."""

    step: int
    whole_step: int | None  # the last step before it in the log (None: it was the log's first)
    reached: dict[int, tuple[int, ...]]  # cache -> layers whose update of the step reached the log
    missing: dict[int, tuple[int, ...]]  # cache -> layers its previous step wrote that this one did not
    raised: bool = False


def cut_last_step(
    events: list[KvEvent], raised: int | None = None, block_raised: bool = False
) -> CutStep | None:
    """The log's last step where it wrote some layers of a cache that the cache's previous step wrote but
    not all of them (layers update in turn, so a kill between two leaves the first ones written). Layers
    holding fewer tokens (a sliding window) still update every step, so they tell nothing apart. A cut in a
    cache's first step (a prefill) cannot be told from the log: a pipeline stage holds some layers only.

    `raised`: the step whose forward raised, as its memory sample says: cut whichever of its layers the log
    holds (all of them where it raised after its last layer's update, none where before its first; a
    prefill too), where no later step followed it (code that caught the error and went on). `block_raised`:
    the recorded block raised or was interrupted, in a run whose samples do not say in which forward
    (recorded before they did): its last step is cut where the layers tell, as a killed run's is. Either
    way the block's logged teardown follows the cut step."""
    last_step = -1
    current: dict[int, tuple[int, set[int]]] = {}  # cache -> (its latest step, the layers it wrote then)
    previous: dict[int, set[int]] = {}  # cache -> the layers its step before that wrote
    for ev in events:
        if ev.phase == "end":
            if raised is None and not block_raised:
                return None  # the run's teardown was logged: it ended
            break
        last_step = ev.step
        if ev.event == "freed" or not holds_tokens(ev):
            continue
        step, layers = current.get(ev.cache, (-1, set()))
        if step != ev.step:
            if step >= 0:
                previous[ev.cache] = layers
            layers = set()
            current[ev.cache] = (ev.step, layers)
        layers.add(ev.layer)
    if raised is not None and raised < last_step:
        return None
    cut_step = last_step if raised is None else raised
    reached: dict[int, tuple[int, ...]] = {}
    missing: dict[int, tuple[int, ...]] = {}
    for cache, (step, layers) in current.items():
        if step == cut_step:
            gone = previous.get(cache, set()) - layers
            if gone or raised is not None:
                reached[cache], missing[cache] = tuple(sorted(layers)), tuple(sorted(gone))
        elif raised is not None and step == last_step:  # the raised step logged none of its layers
            reached[cache], missing[cache] = (), tuple(sorted(layers))
    if not missing:
        return None
    whole = max((ev.step for ev in events if ev.step < cut_step and ev.phase != "end"), default=None)
    return CutStep(
        step=cut_step,
        whole_step=whole,
        reached=reached,
        missing=missing,
        raised=raised is not None or block_raised,
    )
