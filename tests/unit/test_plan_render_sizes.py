"""The plan's table writes a size under 1 KiB in bytes, as the other commands do ("0 B", not "0.00 KiB")."""

from __future__ import annotations

import json
from typing import Any

from kvtrace.cli import main


def test_a_zero_reserve_reads_0_b(capsys: Any) -> None:
    # GIVEN a plan with no reserve; WHEN planned
    assert main(["plan", "--preset", "llama-3.1-8b", "--gpu-memory", "24GiB", "--reserve", "0"]) in (0, 1)
    lines = capsys.readouterr().out.splitlines()
    # THEN its reserve row says 0 B
    (reserve,) = [line.split() for line in lines if line.strip().startswith("reserve")]
    assert reserve == ["reserve", "0", "B"]


def test_the_kv_room_row_says_what_the_paged_blocks_are_counted_in(capsys: Any) -> None:
    # GIVEN Llama 3.1 8B (bf16 KV: 32 layers x K,V x 8 heads x 128 x 2 B = 131,072 B a token) on 24 GiB,
    # planned with 32-token blocks
    argv = ["plan", "--preset", "llama-3.1-8b", "--gpu-memory", "24GiB", "--block-size", "32"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    room, blocks = plan["kv_budget_bytes"], plan["kv_blocks"]
    assert room == 24 * 2**30 - plan["weights_bytes"] - plan["reserve_bytes"] - plan["activations_bytes"]
    assert blocks == room // (32 * 2 * 8 * 128 * 2 * 32) > 0

    # WHEN the table is printed
    assert main(argv) == 0
    (row,) = [
        line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("KV room")
    ]

    # THEN the row gives the room's size, whose it is (this batch's peak), its blocks, their size in tokens
    # and the tokens they hold, and does not pass it for vLLM's pool, which --engine vllm sizes otherwise
    assert row.endswith(
        "beside the weights, the reserve and the activations at batch 1's peak: "
        f"{blocks:,} blocks of 32 tokens ({blocks * 32:,} tokens over all rows); not vLLM's pool "
        "(--engine vllm plans that)"
    ), row


def test_a_context_that_never_fits_says_none_not_0(capsys: Any) -> None:
    # GIVEN Llama 3.1 8B's bf16 weights (over 14 GiB) on 16 GiB with the default reserve: nothing fits
    argv = ["plan", "--preset", "llama-3.1-8b", "--gpu-memory", "16GiB"]
    assert main([*argv, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["max_context"] == 0
    # WHEN the table is printed; THEN its row says no context fits, as the shortest plan counts
    assert main(argv) == 1
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "max context @ batch 1  none: not even 2 tokens" in lines, lines
