"""`kvtrace run script.py`: a script recorded as it is written, its model made inside it and found at its
first generate() (record(model="auto")), as `memray run` or `nsys profile` take a program."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.generation.utils import GenerationMixin

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import tiny_size

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT = 2, 2, 16, 2, 8

# A user's script: builds its model, then generates; `--new-tokens N` from its own command line; what
# follows `# then` is put in by each test.
SCRIPT = textwrap.dedent(
    f"""
    import argparse, sys
    import torch
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=2)
    args = parser.parse_args()
    model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
    ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    print("generated", tuple(out.shape))
    # then
    """
)


def _kv_bytes(tokens: int) -> int:
    """layers x K,V x kv_heads x head_dim x tokens x batch x 4 B (fp32)."""
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * BATCH * 4


def _generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> None:
    """`new_tokens` greedy tokens after every row of `ids`, as the scripts here generate them."""
    model.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def _kvtrace_run(
    tmp_path: Path, *argv: str, then: str = "", script: str | None = None
) -> subprocess.CompletedProcess:
    """`kvtrace run ...` in a fresh process, in `tmp_path`, with the script written there as user.py
    (SCRIPT, or `script`)."""
    source = SCRIPT.replace("# then", then) if script is None else script
    (tmp_path / "user.py").write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "run", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A child's Ctrl-C as a terminal's process gets it: a suite started in the background of a shell without
    job control (`pytest &`) has SIGINT ignored, which its children inherit, and Python then installs no
    KeyboardInterrupt handler (the reference `python user.py` ran to its end and exited 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _report(run: Path, capsys: Any) -> dict[str, Any]:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_script_is_recorded_as_written_with_its_model_found(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that builds its model and generates 6 tokens (its own flag), run under kvtrace
    done = _kvtrace_run(tmp_path, "user.py", "--new-tokens", "6")

    # THEN the script ran as itself (its argv, its output), and kvtrace said where the run is
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"generated ({BATCH}, {PROMPT + 6})"]
    assert "kvtrace run: recorded runs/user (model LlamaForCausalLM)" in done.stderr

    # AND the run is what record(model=...) around its generate() gives: the model's geometry, its 6 steps,
    # KV = the arithmetic (the prompt and every new token but the last), the weights apart from the rest
    report = _report(tmp_path / "runs" / "user", capsys)
    assert report["geometry"]["class"] == "LlamaForCausalLM" and report["geometry"]["num_layers"] == LAYERS
    assert report["steps"] == 6
    assert report["kv"]["final_bytes"] == _kv_bytes(PROMPT + 6 - 1) == 13312
    assert report["kv"]["bytes_per_token_expected"] == 512
    model = build_model(tiny_size(LAYERS, kv_heads=KV_HEADS))
    tensors = [*model.parameters(), *model.buffers()]  # the rotary buffers too, tied weights once
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert report["categories_at_peak"]["weights"] == sum(held.values())

    # AND `plan --from-run` plans the model, which no record(model=...) named
    assert main(["plan", "--from-run", str(tmp_path / "runs" / "user"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kv_bytes"] == _kv_bytes(PROMPT + 6 - 1)


def test_the_scripts_exit_status_and_errors_are_its_own(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that exits with 3 after generating: the run ended well, the status is the script's
    done = _kvtrace_run(tmp_path, "-o", "exits", "user.py", then="sys.exit(3)")
    assert done.returncode == 3, done.stderr[-3000:]
    assert json.loads((tmp_path / "exits" / "manifest.json").read_text())["ended"]["status"] == "ok"

    # GIVEN one that raises: its traceback from its own frames, status 1, the run ended as it raised
    done = _kvtrace_run(tmp_path, "-o", "raises", "user.py", then="raise ValueError('boom')")
    assert done.returncode == 1
    assert "ValueError: boom" in done.stderr and 'user.py", line' in done.stderr
    assert "runpy" not in done.stderr and "kvtrace/commands" not in done.stderr, done.stderr
    ended = json.loads((tmp_path / "raises" / "manifest.json").read_text())["ended"]
    assert (ended["status"], ended["type"]) == ("exception", "ValueError")
    assert _report(tmp_path / "raises", capsys)["kv"]["final_bytes"] == _kv_bytes(PROMPT + 2 - 1)


def test_bad_targets_and_occupied_folders_are_one_line(tmp_path: Path) -> None:
    done = _kvtrace_run(tmp_path, "missing.py")
    assert done.returncode == 2 and done.stderr == "kvtrace run: error: missing.py: no such file\n"
    assert _kvtrace_run(tmp_path, "-o", "r", "user.py").returncode == 0
    done = _kvtrace_run(tmp_path, "-o", "r", "user.py")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "r: already holds a run; pass --overwrite" in done.stderr
    assert _kvtrace_run(tmp_path, "-o", "r", "--overwrite", "user.py").returncode == 0


def test_overwrite_of_a_run_it_cannot_replace_safely_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    # GIVEN a run whose profiler/ is a link to a folder elsewhere
    run, elsewhere = tmp_path / "A", tmp_path / "T"
    shutil.copytree(REPO_ROOT / "sample_traces" / "dynamic_b2", run)
    (run / "profiler").rename(elsewhere)
    (run / "profiler").symlink_to(Path("..") / "T")
    before = sorted(p.name for p in run.iterdir())

    # WHEN `kvtrace run --overwrite` records a script into it
    done = _kvtrace_run(tmp_path, "-o", "A", "--overwrite", "user.py", script='print("the script ran")\n')

    # THEN one line naming the link, exit status 2, before the script runs; no "recorded" line (it was exit
    # status 1, OSError's traceback, the old run's logs deleted, and "kvtrace run: recorded A")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "kvtrace run: error: A/profiler: a symbolic link where the run's profiler/ folder goes (kvtrace "
        "removes nothing through one): nothing was removed; remove the link, or record into another folder\n"
    )
    assert sorted(p.name for p in run.iterdir()) == before and len(list(elsewhere.iterdir())) == 1


def test_a_module_runs_with_dash_m(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "gen.py").write_text(SCRIPT.replace("# then", ""), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "run", "-m", "pkg.gen", "--new-tokens", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{tmp_path}"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _report(tmp_path / "runs" / "gen", capsys)["kv"]["final_bytes"] == _kv_bytes(PROMPT + 3 - 1)


@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "light"])
def test_record_auto_finds_the_model_at_its_first_generate_and_lets_generate_go(
    tmp_path: Path, capsys: Any, profiler: bool
) -> None:
    # GIVEN a model made inside record(model="auto"), a forward of its own before its generate()
    original = GenerationMixin.__dict__["generate"]
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model="auto", profiler=profiler) as recording:
        model = build_model(tiny_size(LAYERS, kv_heads=KV_HEADS))
        model(ids)
        assert recording.model is None
        _generate(model, ids, 4)
        assert recording.model is model
    # THEN transformers' generate() is its own again
    assert GenerationMixin.__dict__["generate"] is original
    # AND the run has the generate() call's steps after the forward's own, its KV the arithmetic's
    report = _report(tmp_path / "run", capsys)
    assert report["kv"]["final_bytes"] == _kv_bytes(PROMPT + 4 - 1)
    assert report["geometry"]["class"] == "LlamaForCausalLM"


# generate() on a thread, its tokens read from a TextIteratorStreamer on the main one, as a chat UI does
STREAMER_SCRIPT = textwrap.dedent(
    f"""
    import threading
    import torch
    from transformers import TextIteratorStreamer
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    class Digits:  # a tokenizer's decode() is all the streamer asks of it
        def decode(self, ids, **kwargs):
            return " ".join(str(i) for i in ids)

    model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
    ids = torch.randint(3, 1000, (1, {PROMPT}), generator=torch.Generator().manual_seed(0))
    streamer = TextIteratorStreamer(Digits())

    def generate():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                           do_sample=False, pad_token_id=0, streamer=streamer)

    thread = threading.Thread(target=generate)
    thread.start()
    print("streamed", sum(1 for _ in streamer) > 0)
    thread.join()
    """
)


def test_a_generate_on_a_streamers_thread_is_recorded_not_killed(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script whose only generate() runs on a thread of its own (a TextIteratorStreamer's), recorded
    # with the profiler: started on that thread, it was stopped on the main one and kineto killed the process
    # (SIGSEGV, exit 139, the run left "running")
    done = _kvtrace_run(tmp_path, "user.py", script=STREAMER_SCRIPT)

    # THEN the script ends as itself, and its run is written
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "streamed True\n"
    manifest = json.loads((tmp_path / "runs" / "user" / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    assert any("profiler not started" in note for note in manifest["notes"]), manifest["notes"]

    # AND it is what record(model=...) around that thread's generate() gives: 5 steps of batch 1, KV the
    # arithmetic of the prompt and every new token but the last, the peak the weights and KV (the profiler
    # records the memory events of the block's thread only, none of the generating thread's)
    report = _report(tmp_path / "runs" / "user", capsys)
    kv_final = LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + 5 - 1) * 1 * 4
    assert (
        (report["steps"], report["kv"]["batch"], report["kv"]["final_bytes"])
        == (5, 1, kv_final)
        == (5, 1, 6144)
    )
    model = build_model(tiny_size(LAYERS, kv_heads=KV_HEADS))
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    assert report["categories_at_peak"]["weights"] == sum(held.values())
    assert report["peak_allocated_bytes"] == sum(held.values()) + report["kv"]["peak_bytes"]


def test_compare_times_a_scripts_run_from_its_models_first_generate(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that takes 2 s before its generate() (imports, loading a model), then generates 6
    # tokens: compare timed it from the script's start, its tokens/s the load's (a 1.5 s load: 2.0 per row
    # where generation's own was 12.6)
    script = SCRIPT.replace(
        "args = parser.parse_args()", "args = parser.parse_args()\nimport time; time.sleep(2)"
    )
    done = _kvtrace_run(tmp_path, "-o", "run", "user.py", "--new-tokens", "6", script=script)
    assert done.returncode == 0, done.stderr[-3000:]

    # WHEN compare reads it beside record(model=...) around the same generate()
    model = build_model(tiny_size(LAYERS, kv_heads=KV_HEADS))
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "around", model=model):
        _generate(model, ids, 6)
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "around"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)["runs"][0]

    # THEN its time runs from the model's first generate() (the manifest's model_found_ns) to the last step's
    # end sample, as a record(model=...) around the call is timed from its start sample
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    samples = [
        json.loads(line) for line in (tmp_path / "run" / "memory_samples.jsonl").read_text().splitlines()
    ]
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    last_step = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    # (the 2 s sleep lies before the model's first generate(); how long the 6 tokens took is the host's)
    assert manifest["model_found_ns"] - start >= 2e9 and last_step > manifest["model_found_ns"]
    assert figures["generated_tokens_per_row"] == 6
    assert figures["tokens_per_second_per_row"] == pytest.approx(
        6 / ((last_step - manifest["model_found_ns"]) / 1e9)
    )
    assert figures["tokens_per_second"] == pytest.approx(
        6 * BATCH / ((last_step - manifest["model_found_ns"]) / 1e9)
    )


# What pip installs as the `kvtrace` command: Python puts its folder, not the working one, first on sys.path
CONSOLE_SCRIPT = (
    "import sys\nfrom kvtrace.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
)

# A script that says what it was given, its own flags looking like kvtrace's
IDENTITY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    print(json.dumps([__name__, __file__, sys.path[0], sys.argv, sys.modules["__main__"].__file__]))
    """
)


def _as_installed(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`kvtrace ...` as the installed command runs it, in `tmp_path`, kvtrace importable from the checkout."""
    command = tmp_path / "bin" / "kvtrace"
    command.parent.mkdir(exist_ok=True)
    command.write_text(CONSOLE_SCRIPT, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(command), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_a_script_is_given_what_python_gives_it(tmp_path: Path) -> None:
    # GIVEN a script in a folder with a space, its own -o, --overwrite and -m after its name
    (tmp_path / "my scripts").mkdir()
    (tmp_path / "my scripts" / "who am i.py").write_text(IDENTITY_SCRIPT, encoding="utf-8")
    argv = ["my scripts/who am i.py", "-o", "x", "--overwrite", "-m", "y"]
    python = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert python.returncode == 0, python.stderr

    # WHEN the installed `kvtrace run` runs it
    done = _as_installed(tmp_path, "run", "-o", "run", *argv)

    # THEN it sees what `python script.py` shows it: __main__, its absolute __file__ (a relative one before,
    # lost after an os.chdir), its own folder first on sys.path, sys.argv as typed
    assert done.returncode == 0, done.stderr[-3000:]
    script = str(tmp_path / "my scripts" / "who am i.py")
    expected = ["__main__", script, str(tmp_path / "my scripts"), argv, script]
    assert json.loads(python.stdout) == expected
    assert json.loads(done.stdout) == expected


def test_a_scripts_own_double_dash_is_its_own(tmp_path: Path) -> None:
    # GIVEN a script whose arguments hold a `--` (a separator it passes on to a tool it runs)
    (tmp_path / "who.py").write_text(IDENTITY_SCRIPT, encoding="utf-8")
    argv = ["who.py", "--", "x", "--", "y"]
    python = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert python.returncode == 0, python.stderr

    # WHEN `kvtrace run` runs it, once as typed, once after kvtrace's own `--` (the end of its options)
    plain = _as_installed(tmp_path, "run", "-o", "plain", *argv)
    ended = _as_installed(tmp_path, "run", "-o", "ended", "--", *argv)

    # THEN both give it the sys.argv python gives it: its first `--` was dropped ("who.py", "x", "--", "y")
    assert json.loads(python.stdout)[3] == argv
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout)[3] == argv
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert json.loads(ended.stdout)[3] == argv


def test_a_module_runs_with_the_installed_command(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a package in the working folder, which `python -m pkg.gen` finds there (sys.path[0])
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "gen.py").write_text(SCRIPT.replace("# then", ""), encoding="utf-8")

    # WHEN the installed `kvtrace run -m pkg.gen` runs it: "No module named 'pkg'" before, with kvtrace's
    # traceback, exit 1, and a model-less run written
    done = _as_installed(tmp_path, "run", "-m", "pkg.gen", "--new-tokens", "3")

    # THEN it runs as `python -m pkg.gen` does, its run the arithmetic's
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"generated ({BATCH}, {PROMPT + 3})"]
    assert _report(tmp_path / "runs" / "gen", capsys)["kv"]["final_bytes"] == _kv_bytes(PROMPT + 3 - 1)

    # AND a module not there is one line, exit 2, nothing written
    done = _as_installed(tmp_path, "run", "-o", "missing", "-m", "nopkg.gen")
    assert done.returncode == 2
    assert done.stderr == f"kvtrace run: error: nopkg.gen: no module named 'nopkg' (from {tmp_path})\n"
    assert not (tmp_path / "missing").exists()


def test_a_script_without_generate_says_why_its_run_has_no_trace(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that runs its model's forwards over a DynamicCache itself, never generate(), recorded
    # with the profiler asked for (no --no-profiler): it starts at a first generate(), so it never started
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import DynamicCache
        from kvtrace.llama import build_model
        from tests.tiny import cache_arg, tiny_size

        model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
        ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            for _ in range(3):
                ids = model(ids, **cache_arg(cache), use_cache=True).logits[:, -1:].argmax(-1)
        """
    )
    done = _kvtrace_run(tmp_path, "-o", "run", "user.py", script=script)
    assert done.returncode == 0, done.stderr[-3000:]

    # THEN its KV is the arithmetic's (the prompt and 2 tokens), and both the run's last line and its notes
    # say why the memory figures are the KV log's alone (before: "peak 13.50 KiB (KV only)", no reason)
    report = _report(tmp_path / "run", capsys)
    assert report["kv"]["final_bytes"] == _kv_bytes(PROMPT + 2)
    assert "no profiler trace (it starts at the first generate())" in done.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert any(note.startswith("no profiler trace: record(model='auto')") for note in manifest["notes"])
    assert not (tmp_path / "run" / "profiler").exists()


KVTRACE_RUN_NO_MODEL = (
    "the recording (kvtrace run, or record(model='auto')) found no generate() call, so the run has no model: "
    "its weights are not in its figures (its peak and final leave them out); to count them, call the model's "
    "generate() while it records (the first model whose generate() runs is recorded), or record your own "
    "forwards with kvtrace.record(model=model) in the script"
)

# A script that runs one forward of its model over a DynamicCache, never generate()
_FORWARD_WITHOUT_GENERATE = textwrap.dedent(
    f"""
    import torch
    from transformers import DynamicCache
    from kvtrace.llama import build_model
    from tests.tiny import cache_arg, tiny_size

    model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
    ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, **cache_arg(DynamicCache(config=model.config)), use_cache=True)
    """
)


def test_plan_from_a_kvtrace_run_that_found_no_model_says_why(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that never calls generate() (it runs one forward of its model), under kvtrace run
    script = _FORWARD_WITHOUT_GENERATE
    done = _kvtrace_run(tmp_path, "-o", "run", "--no-profiler", "user.py", script=script)
    assert done.returncode == 0, done.stderr[-3000:]

    # WHEN it is planned from
    assert main(["plan", "--from-run", str(tmp_path / "run")]) == 2

    # THEN the one-line refusal says what happened, not "recorded without model=", an argument that a
    # kvtrace run user never gives
    err = capsys.readouterr().err
    assert err == (
        f"kvtrace plan: error: {tmp_path / 'run' / 'manifest.json'}: no model geometry (kvtrace run found "
        "no generate() call, so no model was recorded): plan it with --preset or --config instead of "
        "--from-run\n"
    )


@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "no-profiler"])
def test_a_script_without_generate_is_advised_what_kvtrace_run_can_do(
    tmp_path: Path, capsys: Any, profiler: bool
) -> None:
    # GIVEN a script that runs one forward of its model over a DynamicCache, never generate(), recorded by
    # kvtrace run (with and without the profiler: only the profiled run's manifest has the note about it)
    script = _FORWARD_WITHOUT_GENERATE
    flags = () if profiler else ("--no-profiler",)
    done = _kvtrace_run(tmp_path, "-o", "run", *flags, "user.py", script=script)
    assert done.returncode == 0, done.stderr[-3000:]

    # WHEN it is reported
    report = _report(tmp_path / "run", capsys)

    # THEN its KV is the prompt's, and the note on its weights says what a `kvtrace run` user can do (it
    # said "pass model= to kvtrace.record()", a call the script does not make)
    assert report["kv"]["final_bytes"] == _kv_bytes(PROMPT)
    assert KVTRACE_RUN_NO_MODEL in report["notes"]
    assert not [note for note in report["notes"] if "pass model=" in note]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["model_auto"] is True


# After the script's first generate(): a second one, whose 3rd forward (the prefill and 2 decode steps)
# ends with the signal `{signal}` sent to the script's own process, as a scheduler or a Ctrl-C would send it;
# an exit handler of the script's own says whether it ran.
SIGNALLED = """
import atexit, os, signal
atexit.register(lambda: print("the script's exit handler ran", flush=True))
forwards = []

def hook(module, args, output):
    forwards.append(1)
    if len(forwards) == 3:
        os.kill(os.getpid(), signal.{signal})

model.register_forward_hook(hook)
with torch.no_grad():
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                   do_sample=False, pad_token_id=0)
print("not reached")
"""


def test_a_sigterm_ends_the_script_with_its_run_named_and_dies_of_it(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a script that a scheduler's time limit SIGTERMs in its second generate()'s third step
    done = _kvtrace_run(tmp_path, "--no-profiler", "user.py", then=SIGNALLED.format(signal="SIGTERM"))

    # THEN the process dies of SIGTERM, as without kvtrace (143 in a shell), nothing of the script's after it
    assert done.returncode == -signal.SIGTERM, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"generated ({BATCH}, {PROMPT + 2})"]

    # ... and kvtrace's last line still says where the run is and why it stopped, as a SLURM log's only
    # pointer to it (before: no line at all, the process killed inside the recording's end)
    assert done.stderr.endswith(
        "kvtrace run: recorded runs/user (model LlamaForCausalLM; the script was stopped by SIGTERM); "
        "next: kvtrace report runs/user, kvtrace diagnose runs/user\n"
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr  # Python's default SIGTERM prints none

    # AND the run is written: stopped by SIGTERM, its KV the prompt and the 2 tokens fed back by then
    ended = json.loads((tmp_path / "runs" / "user" / "manifest.json").read_text())["ended"]
    assert (ended["status"], ended["signal"]) == ("interrupted", "SIGTERM")
    assert _report(tmp_path / "runs" / "user", capsys)["kv"]["final_bytes"] == _kv_bytes(PROMPT + 2) == 10240


def test_a_ctrl_c_ends_the_script_as_python_ends_it(tmp_path: Path) -> None:
    # GIVEN a script interrupted by a Ctrl-C in its second generate()'s third step
    then = SIGNALLED.format(signal="SIGINT")
    done = _kvtrace_run(tmp_path, "--no-profiler", "user.py", then=then)

    # THEN it ends as `python user.py` ends: its exit handlers run, then the process dies of SIGINT (130 in a
    # shell), which tells a shell loop to stop (before: exit status 130, read as a Ctrl-C the script
    # handled, and `for s in a b; do kvtrace run $s.py; done` went on to the next script)
    python = subprocess.run(
        [sys.executable, "user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        preexec_fn=_default_sigint,
    )
    assert python.returncode == -signal.SIGINT
    assert done.returncode == python.returncode, done.stderr[-3000:]
    assert done.stdout == python.stdout
    assert done.stdout.splitlines()[-1] == "the script's exit handler ran"

    # ... after its traceback from its own frames, as Python prints it, and kvtrace's line naming the run
    last = "kvtrace run: recorded runs/user (model LlamaForCausalLM); next: kvtrace report runs/user"
    assert done.stderr.endswith(f"KeyboardInterrupt\n{last}, kvtrace diagnose runs/user\n"), done.stderr
    assert 'user.py", line' in done.stderr and "kvtrace/commands" not in done.stderr
    ended = json.loads((tmp_path / "runs" / "user" / "manifest.json").read_text())["ended"]
    assert (ended["status"], ended["type"]) == ("interrupted", "KeyboardInterrupt")


def test_a_module_missing_below_its_package_is_one_line_and_no_run(tmp_path: Path) -> None:
    # GIVEN a package whose __init__ says when it runs, with a module and no __main__
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("print('pkg ran')\n")
    (tmp_path / "pkg" / "mod.py").write_text("print('mod ran')\n")

    # WHEN `kvtrace run -m` is given what `python -m` cannot run: a submodule not there, a package without
    # __main__, a module taken for a package (before: runpy's error inside the recording, an empty run
    # written, exit 1)
    for module, said in (
        ("pkg.missing", f"no module named 'pkg.missing' (in {tmp_path / 'pkg'})"),
        ("pkg", "no module named 'pkg.__main__'; 'pkg' is a package and cannot be directly executed"),
        ("pkg.mod.gen", "'pkg.mod' is a module, not a package"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", "run", "-o", "run", "-m", module],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

        # THEN one line, exit 2, as for a missing top package: no run folder, none of the package's code run
        assert (done.returncode, done.stderr) == (2, f"kvtrace run: error: {module}: {said}\n"), done.stderr
        assert done.stdout == "" and not (tmp_path / "run").exists()
