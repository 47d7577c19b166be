"""muscle.train and muscle.load_checkpoint: the Rust trainer from Python, against the CLI."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import muscle

TINY = dict(steps=4, eval_every=2, width=4, batch=8, unlabeled_batch=16, threads=2)


def test_train_returns_the_summary_and_writes_the_run_folder(tmp_path):
    seen = []
    s = muscle.train(out=tmp_path / "run", progress=seen.append, **TINY)
    assert s["method"] == "muscle" and s["steps"] == 4 and s["model"] == "convnet"
    assert 0.0 <= s["test_accuracy_ema"] <= 1.0
    for f in ["config.json", "split.json", "metrics.jsonl", "checkpoint.safetensors", "resume.safetensors", "summary.json"]:
        assert (tmp_path / "run" / f).is_file(), f
    assert [p["step"] for p in seen] == [1, 2, 3, 4]
    assert "test_accuracy_ema" in seen[1] and "test_accuracy_ema" not in seen[0]


def test_train_writes_the_same_bytes_as_the_command_line(tmp_path, muscle_bin):
    muscle.train(out=tmp_path / "py", **TINY)
    argv = [muscle_bin, "train", "--out", str(tmp_path / "cli")]
    for k, v in TINY.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    subprocess.run(argv, check=True, capture_output=True)
    for f in ["checkpoint.safetensors", "resume.safetensors", "split.json"]:
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    # config.json names its own folder and the build it came from; every option is the same.
    py, cli = (json.loads((tmp_path / d / "config.json").read_text()) for d in ["py", "cli"])
    assert py.pop("out").endswith("py") and cli.pop("out").endswith("cli")
    for provenance in ["git_commit", "features"]:
        py.pop(provenance), cli.pop(provenance)
    assert py == cli


def test_load_checkpoint_gives_the_state_dict_and_metadata(tmp_path):
    muscle.train(out=tmp_path / "run", **TINY)
    state, meta = muscle.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == "4"
    weights = [k for k in state if k.endswith(".weight")]
    assert weights and all(state[k].dtype == np.float32 for k in weights)
    assert any(v.dtype == np.int64 for v in state.values())  # BN's num_batches_tracked
    first = state[weights[0]]
    assert first.ndim == 4 and first.shape[0] == 4 and first.flags.writeable
    assert np.isfinite(first).all() and np.abs(first).sum() > 0


def test_bad_options_and_files_raise_python_exceptions(tmp_path):
    with pytest.raises(ValueError, match="--method"):
        muscle.train(method="nonsense")
    with pytest.raises(ValueError, match="--steps"):
        muscle.train(steps=0)
    with pytest.raises(ValueError, match="--no-such-option"):
        muscle.train(no_such_option=3)
    with pytest.raises(OSError, match="/nonexistent/data"):
        muscle.train(data="/nonexistent/data", steps=1)
    with pytest.raises(OSError, match="nothing.safetensors"):
        muscle.load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors"):
        muscle.load_checkpoint(tmp_path / "bad.safetensors")


def test_a_run_stopped_from_python_resumes_to_the_same_bytes(tmp_path):
    muscle.train(out=tmp_path / "whole", **TINY)

    def stop_at_3(p):
        if p["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        muscle.train(out=tmp_path / "stopped", progress=stop_at_3, **TINY)
    assert not (tmp_path / "stopped" / "summary.json").exists()
    _, meta = muscle.load_checkpoint(tmp_path / "stopped" / "resume.safetensors")
    assert meta["step"] == "2"
    s = muscle.train(resume=tmp_path / "stopped")
    assert s["steps"] == 4
    for f in ["checkpoint.safetensors", "resume.safetensors"]:
        assert (tmp_path / "stopped" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


def test_ctrl_c_stops_a_run_that_then_resumes(tmp_path):
    out = tmp_path / "run"
    # The child restores Python's own Ctrl-C handler: a process started with SIGINT ignored (a
    # test run from a background job of a non-interactive shell) inherits the ignore, and Python
    # then installs no KeyboardInterrupt at all (a local CI run finished all 400 steps that way).
    script = textwrap.dedent(f"""
        import muscle, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def tell(p):
            print(p["step"], flush=True)
        muscle.train(out={str(out)!r}, steps=400, eval_every=2, width=4, batch=8, unlabeled_batch=16,
                     threads=2, progress=tell)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until a checkpoint exists, then press Ctrl-C.
    for line in proc.stdout:
        if int(line) >= 4:
            break
    proc.send_signal(signal.SIGINT)
    # A run that ignored Ctrl-C would go on for minutes: communicate's timeout is the hang check
    # (no tighter bound: a loaded CI machine took 42 s to finish the step and its checkpoint).
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert not (out / "summary.json").exists()
    _, meta = muscle.load_checkpoint(out / "resume.safetensors")
    assert int(meta["step"]) >= 4
    s = muscle.train(resume=out, progress=lambda p: None)
    assert s["steps"] == 400
