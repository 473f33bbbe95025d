"""The stack-frame rules that name an allocation's category where no log does (traces and snapshots from
anyone): a rule is a pattern over an allocation's stack text, with needles that let most texts skip it, and
the first rule that matches wins. `analyzers.attribution` applies them (`METHOD_STACK_RULE`). Pure, no
torch.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from itertools import accumulate, chain

from analyzers.model import KV, WEIGHTS

__all__ = ["RULES", "Rule", "frame_rule_matches"]


@dataclass(frozen=True)
class Rule:
    """A stack-frame pattern and the category it implies. `kv` is "k", "v" or "" (unknown).

    `needles`: substrings of which every match contains at least one. A stack text holding none of them
    skips the pattern: `str.__contains__` is a fast search, while a pattern without a literal prefix (a
    leading word boundary, an alternation) is tried at every position (20 ms per rule on one real snapshot's
    78 stacks of 7 KB). Empty: the pattern always runs.
    """

    pattern: re.Pattern[str]
    category: int
    label: str
    kv: str = ""
    needles: tuple[str, ...] = ()


def _both_separators(*needles: str) -> tuple[str, ...]:
    """Each needle as written on POSIX and on Windows: a snapshot taken on Windows names its frames'
    files with backslashes (``D:\\...\\torch\\nn\\modules\\module.py``)."""
    return tuple(dict.fromkeys(form for needle in needles for form in (needle, needle.replace("/", "\\"))))


RULES: list[Rule] = [
    Rule(
        re.compile(r"cache_utils\.py:\d+:(update|lazy_initialization|_quantize)"),
        KV,
        "transformers cache update",
        needles=("cache_utils.py:",),
    ),
    Rule(
        re.compile(r"cache_utils\.py:\d+:(crop|reorder_cache|batch_select_indices|batch_repeat_interleave)"),
        KV,
        "transformers cache reorder/crop",
        needles=("cache_utils.py:",),
    ),
    Rule(
        re.compile(r"\b(cache_k|k_cache|key_cache)\b"),
        KV,
        "cache_k-style attribute",
        "k",
        needles=("cache_k", "k_cache", "key_cache"),
    ),
    Rule(
        re.compile(r"\b(cache_v|v_cache|value_cache)\b"),
        KV,
        "cache_v-style attribute",
        "v",
        needles=("cache_v", "v_cache", "value_cache"),
    ),
    Rule(re.compile(r"kvpress"), KV, "kvpress compression", needles=("kvpress",)),
    Rule(
        re.compile(
            r"(from_pretrained|load_state_dict|_load_pretrained_model|modeling_utils\.py:\d+:_?init_weights"
            r"|:\d+:init_weights?(_list)?\b)"
        ),
        WEIGHTS,
        "model loading",
        needles=("from_pretrained", "load_state_dict", "_load_pretrained_model", "init_weight"),
    ),
    Rule(
        re.compile(r"torch[/\\]nn[/\\]modules[/\\]module\.py:\d+:(_apply|to|cuda|half|bfloat16|float)\b"),
        WEIGHTS,
        "module.to()/cuda()",
        needles=_both_separators("torch/nn/modules/module.py:"),
    ),
    Rule(
        re.compile(
            r"torch[/\\]nn[/\\]modules[/\\](linear|sparse|normalization)\.py:\d+:(__init__|reset_parameters)"
        ),
        WEIGHTS,
        "parameter initialisation",
        needles=_both_separators("torch/nn/modules/"),
    ),
]


def frame_rule_matches(frames: list[str], rules: list[Rule]) -> tuple[list[int], list[int]]:
    """Category (-1: no rule matched) and K/V code (0: neither, 1: K, 2: V) of every interned stack text."""
    categories = [-1] * len(frames)
    kinds = [0] * len(frames)
    codes = [{"k": 1, "v": 2}.get(rule.kv, 0) for rule in rules]
    for index, tried in enumerate(_rules_to_try(frames, rules)):
        while tried:  # bit r: rule r; the lowest first, as first match wins
            lowest = tried & -tried
            rule_index = lowest.bit_length() - 1
            if rules[rule_index].pattern.search(frames[index]):
                categories[index] = rules[rule_index].category
                kinds[index] = codes[rule_index]
                break
            tried ^= lowest
    return categories, kinds


def _rules_to_try(frames: list[str], rules: list[Rule]) -> list[int]:
    """For each stack text, a bit mask of the rules whose pattern must run on it: those with no needles,
    and those holding one of their needles.

    A needle without a line break is in a stack text exactly when it is in one of its lines, and stacks
    share their lines (a real snapshot's 78 stacks of 7 KB have 340 distinct lines): each distinct line is
    searched once, in one string, instead of every needle over every whole text (4 ms there)."""
    always = 0
    by_text: list[tuple[int, tuple[str, ...]]] = []  # needles with a line break: looked for in each text
    line_needles: dict[str, int] = {}  # needle -> the rules that list it
    for rule_index, rule in enumerate(rules):
        bit = 1 << rule_index
        if not rule.needles:
            always |= bit
        elif any("\n" in needle for needle in rule.needles):
            by_text.append((bit, rule.needles))
        else:
            for needle in rule.needles:
                line_needles[needle] = line_needles.get(needle, 0) | bit
    tried = [always] * len(frames)
    for bit, needles in by_text:
        for index, text in enumerate(frames):
            if any(needle in text for needle in needles):
                tried[index] |= bit
    if not line_needles or not frames:
        return tried
    lines_of = [text.split("\n") for text in frames]
    distinct = list(set(chain.from_iterable(lines_of)))
    ends = list(accumulate(len(line) + 1 for line in distinct))  # each line's end in `joined`, past its "\n"
    joined = "\n".join(distinct)
    line_rules: dict[str, int] = {}  # the few lines that hold a needle -> the rules that list it
    for needle, bits in line_needles.items():
        at = joined.find(needle)
        while at >= 0:
            line_index = bisect.bisect_right(ends, at)
            line = distinct[line_index]
            line_rules[line] = line_rules.get(line, 0) | bits
            at = joined.find(needle, ends[line_index])  # the next line: one hit per line is enough
    if line_rules:
        for index, lines in enumerate(lines_of):
            for line in line_rules.keys() & lines:
                tried[index] |= line_rules[line]
    return tried
