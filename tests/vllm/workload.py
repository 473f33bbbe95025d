"""The vLLM workload the tests, the benchmark and the sample runs share: a tiny Llama 3-shaped model and a
KV pool small enough that eight requests preempt each other.

Importable without vLLM (the model is written with transformers); `make_llm` imports vllm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvtrace.llama import ModelSize

# Llama 3's architecture (GQA: 4 query heads share 2 KV heads; llama3 RoPE), head_dim 64 as vLLM's
# CPU attention wants, a 1000-token vocabulary: ~2.6 M parameters in bfloat16.
SIZE = ModelSize(
    hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=1000
)
DTYPE_BYTES = 2  # bfloat16
BLOCK_SIZE = 32  # vLLM's CPU attention wants a multiple of 32
# KV bytes per token, all layers, K and V: 4 x 2 x 2 x 64 x 2 = 2 KiB; a block of 32 tokens = 64 KiB.
HEAD_DIM = SIZE.hidden_size // SIZE.num_heads
KV_BYTES_PER_TOKEN = SIZE.num_layers * 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES
BLOCK_BYTES = KV_BYTES_PER_TOKEN * BLOCK_SIZE
POOL_BYTES = 16 * BLOCK_BYTES  # 16 blocks, one of them vLLM's null block: 15 x 32 = 480 usable tokens
MAX_MODEL_LEN = 256


def fp8_kv_unsupported() -> str | None:
    """Why vLLM's CPU attention cannot hold an fp8 KV cache on this machine (it raises NotImplementedError
    without AVX-512 or AMX, `vllm.v1.attention.backends.cpu_attn._get_attn_isa`), None where it can: the
    same torch checks vLLM makes."""
    import torch

    if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_supported():
        return None
    return "vLLM's CPU build needs AVX-512 or AMX for an fp8 KV cache, and this CPU has neither"


ROOT = Path(__file__).resolve().parents[2]
REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 8, 40, 48  # 8 x 88 tokens want 8 x 3 blocks: the pool holds 15


def write_model(path: str | os.PathLike[str]) -> Path:
    """A random-weight Llama 3-shaped checkpoint written with save_pretrained (reused if already there)."""
    import torch

    from kvtrace.llama import build_model

    folder = Path(path)
    if (folder / "config.json").exists():
        return folder
    model = build_model(SIZE, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def write_analysis_model(folder: Path) -> Path:
    """The analysis tests' wider shape (hidden 512, 8 query heads over 2 KV heads of 64): 4 layers x 2 x 2
    x 64 x 2 B = 2 KiB of KV per token, as the recorder's workload, with more compute per token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=16384,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def write_gemma3_model(folder: Path) -> Path:
    """A random-weight Gemma 3 text model of 12 layers, Gemma 3's pattern of 5 sliding over 64 tokens then 1
    full, twice (layers 5 and 11 full), 2 KV heads of 64: 512 B of KV a layer and token in bf16."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1000,
        max_position_embeddings=4096,
        sliding_window=64,
        query_pre_attn_scalar=64,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


# Falcon 7B's attention: 4 query heads of 64 share ONE KV head (`multi_query`, the original decoder), which
# the config does not say in `num_key_value_heads` (it has none) nor in `num_kv_heads` (4).
FALCON_SIZE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}


def write_falcon_model(folder: Path) -> Path:
    """A random-weight multi-query Falcon (Falcon 7B's layout, tiny): 2 layers x 2 x 1 KV head x 64 x 2 B
    = 512 B of KV per token."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(**FALCON_SIZE, multi_query=True, new_decoder_architecture=False, alibi=False)
    torch.manual_seed(0)
    FalconForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def checkpoint_shares(
    model_dir: Path, stages: list[range], tp: int = 1, kv_heads: int = SIZE.num_kv_heads
) -> tuple[int, list[int]]:
    """(the checkpoint's parameters, the bytes each pipeline stage's worker holds) from the checkpoint's
    tensors, by vLLM's rules: a stage holds its decoder layers, the first the embedding (rows padded to a
    multiple of 64, vLLM's `DEFAULT_VOCAB_PADDING_SIZE`), the last the final norm and, over more than one
    stage, the embedding again for its lm_head, tied to it. Over `tp` tensor-parallel ranks a worker holds
    its rank's share: the layers' projections and the padded embedding's rows split over the ranks, the K
    and V projections by whole heads (`max(1, kv_heads // tp)` of the `kv_heads`: a copy beyond as many
    ranks as heads), the norms whole on each."""
    from safetensors import safe_open

    params, held = 0, [0] * len(stages)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        for name in checkpoint.keys():  # noqa: SIM118 (safe_open is no dict)
            tensor = checkpoint.get_tensor(name)
            params += tensor.numel()
            nbytes = tensor.numel() * tensor.element_size()
            if name.endswith("embed_tokens.weight"):
                rows = -(-tensor.shape[0] // 64) * 64
                embedding = rows // tp * tensor.shape[1] * tensor.element_size()
                held[0] += embedding
                if len(stages) > 1:
                    held[-1] += embedding
            elif name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                stage = next(i for i, layers in enumerate(stages) if layer in layers)
                if name.endswith(("k_proj.weight", "v_proj.weight")):
                    held[stage] += nbytes * max(1, kv_heads // tp) // kv_heads
                else:  # a projection split over the ranks, a norm whole
                    held[stage] += nbytes // (tp if tensor.dim() == 2 else 1)
            else:  # the final norm
                held[-1] += nbytes
    return params, held


def llm_kwargs(model_path: str | os.PathLike[str], **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "skip_tokenizer_init": True,
        "kv_cache_memory_bytes": POOL_BYTES,
        "block_size": BLOCK_SIZE,
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": REQUESTS,
        "max_num_batched_tokens": 512,  # the start-up profiling pass runs a batch this big: keep it small
        "disable_log_stats": False,
        "enforce_eager": True,
        "dtype": "bfloat16",
        "seed": 0,
    }
    kwargs.update(overrides)
    return kwargs


def make_llm(model_path: str | os.PathLike[str], **overrides: Any) -> Any:
    from vllm import LLM

    return LLM(**llm_kwargs(model_path, **overrides))


def prompt_token_ids(count: int = REQUESTS, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """Token ids with no common prefix (so that blocks are never shared between requests)."""
    return [[(row * 97 + col * 7) % 990 + 5 for col in range(length)] for row in range(count)]


def prompts(count: int = REQUESTS, length: int = PROMPT_TOKENS) -> list[Any]:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(count, length)]


def sampling(new_tokens: int = NEW_TOKENS) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new_tokens, ignore_eos=True, detokenize=False, temperature=0.0)


def metric(llm: Any, name: str) -> float:
    """A counter's value, or a histogram's sum, from `LLM.get_metrics()`."""
    for item in llm.get_metrics():
        if item.name == name:
            return float(getattr(item, "value", getattr(item, "sum", 0.0)))
    raise KeyError(name)


def recorded_files(run_dir: Path) -> dict[str, Any]:
    """A recorded vLLM run's folder and engine files, parsed: `dir`, `engine`, `steps`, `requests`."""

    def lines(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]

    return {
        "dir": run_dir,
        "engine": json.loads((run_dir / "engine.json").read_text()),
        "steps": lines("engine_steps.jsonl"),
        "requests": lines("engine_requests.jsonl"),
    }


def record_drafting(llm: Any, run_dir: Path, requests: list[Any], params: Any) -> dict[str, Any]:
    """A speculative-decoding engine's run recorded (light mode), with vLLM's own figures of it. The caller
    drops the engine and collects it before the next one starts (one collected while another runs breaks
    it)."""
    import kvtrace

    with kvtrace.record(run_dir, model=llm, profiler=False):
        outputs = llm.generate(requests, params, use_tqdm=False)
    figures = {
        **recorded_files(run_dir),
        "outputs": outputs,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "drafts": metric(llm, "vllm:spec_decode_num_draft_tokens"),
    }
    return figures


def run_workload(llm: Any) -> list[Any]:
    return llm.generate(prompts(), sampling(), use_tqdm=False)


def blocks_held_by_requests(steps: list[dict[str, Any]], requests: list[dict[str, Any]]) -> list[int]:
    """Each step's blocks as the request events replayed up to it give them (a request's last event's
    `blocks`): what the step's `blocks_used` must equal where prompts share no prefix (no block is counted
    twice)."""
    held: dict[str, int] = {}
    events = iter(requests)
    pending = next(events, None)
    replayed = []
    for step in steps:
        while pending is not None and pending["step"] <= step["step"]:
            held[pending["request_id"]] = pending["blocks"]
            pending = next(events, None)
        replayed.append(sum(held.values()))
    return replayed


def run_script(*args: str, kvtrace_dir: Path | None, multiprocess: bool) -> dict[str, Any]:
    """Run `python -m tests.vllm.scripts ARGS` in a fresh interpreter (vLLM starts its engine there) and
    return the JSON of its last `KVTRACE-RESULT` line."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0")
    env.pop("KVTRACE_DIR", None)
    if kvtrace_dir is not None:
        env["KVTRACE_DIR"] = str(kvtrace_dir)
    done = subprocess.run(
        [sys.executable, "-m", "tests.vllm.scripts", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))


def child_result(code: str, *argv: str) -> tuple[dict[str, Any], str]:
    """Run `python -c code ARGV` in a fresh interpreter, vLLM's engine in it (freed with the process), and
    return the JSON of its last `KVTRACE-RESULT` line and everything it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT ")), output


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the model's 1000 ids (`t0` ... `t999`) saved beside a checkpoint: what
    vLLM's `LLM.beam_search` needs (it detokenizes each beam), which `skip_tokenizer_init` would refuse."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(SIZE.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", eos_token="t1").save_pretrained(folder)
    return folder
