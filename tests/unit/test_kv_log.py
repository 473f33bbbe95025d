"""KV log replay on small hand-made logs: live bytes, transient peak, churn, evictions, final state."""

from __future__ import annotations

import pytest

from analyzers.eviction_markers import step_marks
from analyzers.kv_log import analyze_kv_log
from kvtrace.format import KvEvent


def ev(seq: int, event: str, layer: int, kv: str, addr: int, nbytes: int, **kw: object) -> KvEvent:
    fields = {"step": 1, "phase": "prefill", "part": "data", "tokens": 0, "shape": [2, 1, 1, 1]}
    fields.update(kw)
    return KvEvent(
        seq=seq, t_ns=seq * 1000, event=event, layer=layer, kv=kv, addr=addr, storage_bytes=nbytes, **fields
    )  # type: ignore[arg-type]


def test_growth_shows_transient_copy_and_churn() -> None:
    # GIVEN one layer's K growing 100 -> 200 bytes by reallocation, then teardown
    events = [
        ev(1, "created", 0, "k", 0xA, 100, tokens=1),
        ev(2, "created", 0, "v", 0xB, 100, tokens=1),
        ev(3, "grown", 0, "k", 0xC, 200, step=2, phase="decode", tokens=2),
        ev(4, "freed", 0, "k", 0xA, 100, step=2, phase="decode"),
        ev(5, "grown", 0, "v", 0xA, 200, step=2, phase="decode", tokens=2),  # address reused
        ev(6, "freed", 0, "v", 0xB, 100, step=2, phase="decode"),
        ev(7, "freed", 0, "k", 0xC, 200, phase="end"),
        ev(8, "freed", 0, "v", 0xA, 200, phase="end"),
    ]
    # WHEN replayed
    kv = analyze_kv_log(events)
    # THEN the final state is the last step's, before teardown
    assert kv.final_bytes == 400
    assert kv.per_layer[0].k_bytes == 200 and kv.per_layer[0].v_bytes == 200
    # the peak counts the old and new K together (100 + 100 + 200), then old V + new K + new V
    assert kv.peak_bytes == 500
    assert kv.allocated_bytes_total == 600
    assert kv.step_live[2] == {0: 400}
    assert kv.storages[3] == (0xA, 200, 5000, 8000, 0, "v", 0)


def test_evictions_count_once_per_row_on_k() -> None:
    events = [
        ev(1, "created", 0, "k", 0xA, 64, tokens=8, shape=[2, 1, 8, 4]),
        ev(2, "evicted", 0, "k", 0xB, 32, tokens=4, evicted_tokens=4, shape=[2, 1, 4, 4], logical_bytes=32),
        ev(3, "evicted", 0, "v", 0xC, 32, tokens=4, evicted_tokens=0, shape=[2, 1, 4, 4], logical_bytes=32),
    ]
    kv = analyze_kv_log(events)
    assert kv.evicted_tokens == 4 * 2
    assert kv.per_layer[0].evicted_tokens == 8
    # the K line that lost tokens, then its V line (V's bytes a token); one chart marker: 4 tokens x 2 rows,
    # and in K as in V 4 tokens x 2 rows x 1 head x 4 dims x 1 B
    assert [(e.kv, e.t_ns) for e in kv.evictions] == [("k", 2000), ("v", 3000)]
    (mark,) = step_marks(kv.evictions)
    assert (mark.kind, mark.evicted_tokens, mark.evicted_bytes, mark.layers) == ("press", 8, 2 * 32, 1)


def test_a_beam_search_reorder_says_its_beams() -> None:
    # GIVEN two caches of 6 rows reordered: one whose first reorder says 3 beams, one with a damaged reason
    events = [
        ev(1, "created", 0, "k", 0xA, 600, tokens=4, shape=[6, 1, 4, 1], cache=1),
        ev(2, "reordered", 0, "k", 0xB, 600, tokens=4, shape=[6, 1, 4, 1], cache=1, reason="beams:3"),
        ev(3, "freed", 0, "k", 0xA, 600, cache=1),
        ev(4, "created", 0, "k", 0xC, 600, tokens=4, shape=[6, 1, 4, 1], cache=2),
        ev(5, "reordered", 0, "k", 0xD, 600, tokens=4, shape=[6, 1, 4, 1], cache=2, reason="beams:\u00b3"),
        ev(6, "freed", 0, "k", 0xC, 600, cache=2),
    ]
    # WHEN replayed
    caches = {c.cache: c for c in analyze_kv_log(events).caches}
    # THEN the first has 3 beams per prompt; the other's rows are beams, how many the log does not say
    assert (caches[1].reordered, caches[1].beams) == (True, 3)
    assert (caches[2].reordered, caches[2].beams) == (True, 0)


def test_a_crop_after_a_steps_end_takes_back_only_its_rejected_drafts() -> None:
    # GIVEN a prefill of a 10-token prompt, a decode step verifying 3 drafts (it writes its token and them:
    # 14 held), the rejection of 2 after its end sample (12), the caller's crop(-5) before the next call (7),
    # and that call's prefill writing 2 positions
    prompt, drafts, rejected, cut, fed = 10, 3, 2, 5, 2
    verified = prompt + 1 + drafts
    kept = verified - rejected
    events = [
        ev(1, "created", 0, "k", 0xA, 64, tokens=prompt),
        ev(2, "grown", 0, "k", 0xB, 64, step=2, phase="decode", tokens=verified),
        ev(3, "freed", 0, "k", 0xA, 64, step=2, phase="decode"),
        ev(5, "cropped", 0, "k", 0xB, 64, step=2, phase="decode", tokens=kept, evicted_tokens=rejected),
        ev(6, "cropped", 0, "k", 0xB, 64, step=2, phase="decode", tokens=kept - cut, evicted_tokens=cut),
        ev(7, "grown", 0, "k", 0xC, 64, step=3, phase="prefill", tokens=kept - cut + fed),
        ev(8, "freed", 0, "k", 0xB, 64, step=3, phase="prefill"),
    ]
    # WHEN replayed with each step's end sample (t_ns = seq x 1000) and each call's prompt end
    step_ends = {1: 1500, 2: 4000, 3: 8500}
    kv = analyze_kv_log(events, prompt_ends={1: prompt, 3: kept - cut + fed}, step_ends=step_ends)
    # THEN the verifying step generated its token and the 1 draft kept (the rejection counts against it, the
    # caller's crop not), and each prefill 1
    accepted = drafts - rejected
    assert kv.caches[0].generated_tokens == 1 + (1 + accepted) + 1 == 4


@pytest.mark.parametrize("with_end_samples", [True, False])
@pytest.mark.parametrize(("reason", "read_as_rejection"), [("caller", False), ("", True)])
def test_a_callers_crop_is_never_a_draft_rejection(
    reason: str, read_as_rejection: bool, with_end_samples: bool
) -> None:
    # GIVEN a prefill of a 10-token prompt, a decode step verifying 3 drafts and keeping them all (its token
    # and them: 14 held), a crop(-1) after it, and the next call's prefill writing 2 positions; the crop has
    # reason "caller" (the recorder saw it made outside the model's generate() calls), or "" (a run recorded
    # before that reason, or without the model)
    prompt, drafts, cut, fed = 10, 3, 1, 2
    verified = prompt + 1 + drafts
    events = [
        ev(1, "created", 0, "k", 0xA, 64, tokens=prompt),
        ev(2, "grown", 0, "k", 0xB, 64, step=2, phase="decode", tokens=verified),
        ev(3, "freed", 0, "k", 0xA, 64, step=2, phase="decode"),
        ev(5, "cropped", 0, "k", 0xB, 64, step=2, phase="decode", tokens=verified - cut, evicted_tokens=cut,
           reason=reason),
        ev(7, "grown", 0, "k", 0xC, 64, step=3, phase="prefill", tokens=verified - cut + fed),
        ev(8, "freed", 0, "k", 0xB, 64, step=3, phase="prefill"),
    ]  # fmt: skip
    # WHEN replayed, with each step's end sample (t_ns = seq x 1000) or without (a run without samples)
    step_ends = {1: 1500, 2: 4000, 3: 8500} if with_end_samples else None
    kv = analyze_kv_log(events, prompt_ends={1: prompt, 3: verified - cut + fed}, step_ends=step_ends)
    # THEN the caller's crop takes none of the verifying step's tokens (its own and the 3 drafts); a crop that
    # does not say whose it is, no larger than those drafts, is read as a rejection where it follows the
    # step's end sample, and without one counts against the step as any crop inside it
    generated = 1 + (1 + drafts) + 1
    assert kv.caches[0].generated_tokens == (generated - cut if read_as_rejection else generated)
