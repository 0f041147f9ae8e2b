"""What a new user met at the edges of the CLI: thread counts, Ctrl-C in a long call, other libraries' noise, two
exports into one folder, negative numbers, errors naming our temporary files, and the start-up's `import onnx`.
Each test reproduces the defect as it was met and checks what happens now."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_model
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from basinguard.cli import build_parser, oversize_warning, quiet_known_noise
from basinguard.cli import main as cli_main
from basinguard.engine.base import EngineError
from basinguard.engine.ort import OrtModel
from basinguard.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "basinguard" / "models" / "shapes"
CPUS = len(os.sched_getaffinity(0))


def run_python(code: str, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, **kwargs)


# ------------------------------------------------------------------------------------------------ threads


def test_more_threads_than_cpus_are_refused_before_any_work(tmp_path, capsys):
    """--threads 999 on 2 CPUs ran a 2.6 s generate for 170 s; it is refused in one line naming the range."""
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(SHIPPED), "--prompt", "a red square", "--steps", "1", "--out", str(out)]
    assert cli_main([*args, "--threads", str(CPUS + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--threads {CPUS + 1}" in err and f"give 1 to {CPUS}" in err, err
    assert not out.exists()
    with pytest.raises(EngineError, match=f"^threads {CPUS + 1} is more than .* give 1 to {CPUS}"):  # the API too
        OrtModel(SHIPPED / "text_encoder" / "model.onnx", threads=CPUS + 1)
    assert cli_main([*args, "--threads", str(CPUS)]) == 0 and out.exists()


def test_the_cpus_counted_are_those_the_process_may_use(tmp_path):
    """Under taskset (a cgroup cpuset, a batch scheduler's allocation) the limit is the affinity mask's CPUs."""
    if CPUS < 2:
        pytest.skip("needs two CPUs to restrict the process to one")
    code = ("import sys; from basinguard.cli import main; "
            "sys.exit(main(['generate', '--prompt', 'a red square', '--steps', '1', '--threads', '2', "
            "'--out', sys.argv[1]]))")
    one_cpu = min(os.sched_getaffinity(0))
    result = run_python(code, str(tmp_path / "x.png"), preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    assert result.returncode == 2 and "--threads 2 is more than the 1 CPU this process may use" in result.stderr
    assert "give 1 to 1" in result.stderr


# --------------------------------------------------------------------------------------- cancel a long call


def slow_unet(path: Path, matmuls: int, side: int = 512) -> None:
    """A stand-in for a UNet at a huge size: the shipped UNet's inputs and output, and a chain of `matmuls` MatMul
    nodes on a (side, side) tensor that depends on the input (so nothing is folded at load). The matrix is
    orthogonal, so the chain stays finite; its sum, times 0, is added to the sample."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((side, side)))
    nodes = [helper.make_node("ReduceSum", ["sample"], ["total"], keepdims=0),
             helper.make_node("Mul", ["w", "total"], ["m0"])]
    for k in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"m{k}", "w"], [f"m{k + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"m{matmuls}"], ["chain"], keepdims=0),
              helper.make_node("Mul", ["chain", "zero"], ["nothing"]),
              helper.make_node("Add", ["sample", "nothing"], ["out_sample"])]
    graph = helper.make_graph(
        nodes, "slow_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 4, "height", "width"]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch_size"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch_size", 32, 64])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch_size", 4, "height", "width"])],
        [numpy_helper.from_array(q.astype(np.float32), "w"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_an_interrupt_cancels_the_running_call_and_keeps_finished_images(tmp_path, sig, code, word):
    """Ctrl-C during a long UNet call took effect only when the call returned (32.6 s at 768²); SIGTERM killed the
    process where it stood. Now either cancels the call (ONNX Runtime's terminate flag) and exits 128 + the signal,
    with the images finished before it written and no temporary file left.

    The model's one UNet call per image is a chain of small MatMuls; the gap between the first two images' lines
    is one image's time. The signal comes 30 % into the third image's call; the process must be gone within 35 %
    of an image's time (waiting for the call would take the remaining 70 %)."""
    model = copy_model(SHIPPED, tmp_path / "model")
    slow_unet(model / "unet" / "model.onnx", matmuls=400)
    out = tmp_path / "out" / "x.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "basinguard.cli", "generate", "--model", str(model), "--prompt", "a red square",
         "--steps", "1", "--num-images", "3", "--batch-size", "1", "--threads", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        times = []
        for line in proc.stdout:  # "PATH  seed=… transition_step=…", printed once an image is written
            if " seed=" in line:
                times.append(time.monotonic())
            if len(times) == 2:
                break
        assert len(times) == 2, proc.stderr.read()
        image_time = times[1] - times[0]
        time.sleep(0.3 * image_time)
        proc.send_signal(sig)
        sent = time.monotonic()
        returncode = proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert returncode == code and err.strip().endswith(f"basinguard generate: {word}"), err
    assert took < 0.35 * image_time, (took, image_time)
    for k in (0, 1):
        with Image.open(out.with_name(f"x-{k}.png")) as image:
            assert image.size == (32, 32)
            image.load()  # the whole file reads
    assert sorted(p.name for p in out.parent.iterdir()) == ["x-0.png", "x-1.png"]  # no x-2, no .tmp


def test_an_exception_in_the_wait_terminates_the_run_it_waited_for(tmp_path):
    """The engine's side alone: an exception raised in the main thread while a call runs (as a signal handler's
    would be) ends the ONNX Runtime run, which then returns long before it would have finished."""
    path = tmp_path / "slow.onnx"
    slow_unet(path, matmuls=200)
    model = OrtModel(path, threads=1)
    feed = {"sample": np.ones((1, 4, 4, 4), np.float32), "timestep": np.zeros(1, np.float32),
            "encoder_hidden_states": np.zeros((1, 32, 64), np.float32)}
    start = time.monotonic()
    np.testing.assert_array_equal(model.run(feed)["out_sample"], feed["sample"])
    whole = time.monotonic() - start

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2 * whole)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            model.run(feed)
        took = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert took < 0.5 * whole, (took, whole)
    np.testing.assert_array_equal(model.run(feed)["out_sample"], feed["sample"])  # the session still runs


def test_a_size_far_above_the_native_one_is_warned_about(tmp_path, capsys):
    """1024² or 4096² on the 32 px model ran for minutes to hours without a word."""
    args = ["generate", "--prompt", "a red square", "--steps", "1", "--threads", "1", "--out", str(tmp_path / "x.png")]
    assert cli_main([*args, "--height", "128", "--width", "64"]) == 0
    err = capsys.readouterr().err
    # 128x64 against 32x32: 4x per side, 8x the pixels; the work between 8x and 64x a native call's
    assert err.startswith("basinguard generate: warning: 128x64 is 4x this model's native 32x32 per side "
                          "(8x the pixels): each UNet call does 8x to 64x the work"), err
    assert cli_main([*args, "--height", "64", "--width", "64"]) == 0  # 2x per side: as asked, no word
    assert capsys.readouterr().err == ""
    assert oversize_warning((64, 64), 4096, 4096).split(": ", 1)[0] == (
        "4096x4096 is 64x this model's native 64x64 per side (4,096x the pixels)")


# -------------------------------------------------------------------------------------- other libraries' words


def test_a_library_warning_is_printed_in_its_own_form_and_ours_with_our_prefix(tmp_path, capsys):
    """`basinguard: warning: CUDA is not available…` was torch's warning printed as if it were ours."""
    assert cli_main(["detect", "--seeds", "0", "p.txt"]) == 2  # any run of main sets the warning display
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("a library's message", UserWarning, "/somewhere/site-packages/lib/mod.py", 12)
        warnings.warn_explicit("a deprecation", DeprecationWarning, "/somewhere/lib/other.py", 3)
        write_atomic(tmp_path / "memo-parent-is-a-file", b"")
        from basinguard.files import file_digests

        (tmp_path / "model.onnx").write_bytes(b"x")
        file_digests([tmp_path / "model.onnx"], tmp_path / "memo-parent-is-a-file" / "memo.json")  # ours: warns
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "/somewhere/site-packages/lib/mod.py:12: UserWarning: a library's message"
    assert err[1] == "/somewhere/lib/other.py:3: DeprecationWarning: a deprecation"
    assert err[2].startswith("basinguard: warning: cannot write the file-hash cache"), err


def test_known_library_noise_is_silenced_and_the_rest_passes():
    """diffusers' "Multiple distributions found for package optimum" and Ray's token-authentication WARNING and
    INFO lines, from the libraries' own loggers and functions; Ray's warning that authentication is off stays."""
    from diffusers.utils import logging as diffusers_logging
    from ray._private.authentication import authentication_token_setup as ray_auth

    quiet_known_noise()
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)  # what the libraries' own handlers would be given
    diffusers_logger = diffusers_logging.get_logger("diffusers.utils.import_utils")
    ray_logger = logging.getLogger(ray_auth.__name__)
    before = ray_logger.level, diffusers_logger.level
    ray_logger.setLevel(logging.INFO)  # as Ray's own setup leaves it when it starts a local instance
    diffusers_logger.setLevel(logging.WARNING)  # diffusers' default, whatever an earlier test set its verbosity to
    for logger in (diffusers_logger, ray_logger):
        logger.addHandler(handler)
    try:
        diffusers_logger.warning("Multiple distributions found for package optimum. Picked distribution: optimum-onnx")
        diffusers_logger.warning("some other diffusers warning")
        ray_auth._warn_token_auth_enabled()
        ray_logger.info("Generated new authentication token and saved to /root/.ray/auth_token")
        ray_auth._warn_token_auth_disabled()
    finally:
        for logger in (diffusers_logger, ray_logger):
            logger.removeHandler(handler)
        ray_logger.setLevel(before[0])
        diffusers_logger.setLevel(before[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()
        warnings.warn_explicit("CUDA is not available or torch_xla is imported. Disabling autocast.", UserWarning,
                               "/x/diffusers/models/transformers/transformer_kandinsky.py", 168)
    lines = shown.getvalue().splitlines()
    assert lines[0] == "some other diffusers warning"
    assert len(lines) == 2 and lines[1].startswith("Token authentication is disabled for this Ray cluster"), lines
    assert caught == []


# ------------------------------------------------------------------------------------------------- export


def test_an_export_into_a_relative_path_is_not_taken_for_a_second_one(tmp_path, monkeypatch):
    """OUT given relative to the working folder: the export's own lock (named absolutely) is not another export's."""
    pytest.importorskip("torch")
    from basinguard.export.out_folder import prepare_out

    monkeypatch.chdir(tmp_path)
    work, lock = prepare_out(Path("build") / "out")
    try:
        assert work.is_dir() and work.parent == (tmp_path / "build").resolve()
    finally:
        os.close(lock)


def test_a_second_export_into_one_folder_is_refused_at_its_start(tiny_sd_pipeline_dir, tmp_path):
    """The second did the whole export, then failed with "Directory not empty". Also: the export's stderr carries
    no library noise dressed as ours (torch's autocast warning, printed twice per export)."""
    out = tmp_path / "onnx"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "basinguard.cli", "export", str(tiny_sd_pipeline_dir), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        from basinguard.files import lock_held

        deadline = time.monotonic() + 120
        while not any(lock_held(p) for p in tmp_path.glob(".onnx.partial-*.lock")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "basinguard.cli", "export", str(tiny_sd_pipeline_dir),
                                 str(out)], capture_output=True, text=True, env=env, timeout=120)
        still_running = first.poll() is None
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    # refused before any model loads (the memory estimate reads configs only)
    assert second.returncode == 2 and [line.split(":")[0] for line in second.stdout.splitlines()] == ["memory"]
    assert second.stderr == (f"basinguard export: error: another export into {out} is running; wait for it to "
                             "finish or choose another path\n")
    assert still_running  # refused before the first one finished: it did no export of its own
    assert first.returncode == 0 and (out / "unet" / "model.onnx").is_file(), stderr
    assert "basinguard: warning" not in stderr and "autocast" not in stderr and "Multiple distributions" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no lock or working folder left


# ----------------------------------------------------------------------------------------- negative numbers


@pytest.mark.parametrize("flag, text, value", [("--pre-scale", "-5e-1", -0.5), ("--guidance-scale", "-1e3", -1000.0),
                                               ("--crops-coords-top-left", "-1,0", (-1, 0)),
                                               ("--pre-scale", "-.5", -0.5), ("--seed", "-3", -3)])
def test_negative_numbers_are_values(flag, text, value):
    """argparse answered "expected one argument" for '-5e-1', '-1e3' and '-1,0'."""
    args = build_parser().parse_args(["generate", "--prompt", "x", flag, text])
    assert getattr(args, flag[2:].replace("-", "_")) == value


def test_a_negative_value_reaches_the_range_check(capsys):
    assert cli_main(["generate", "--prompt", "x", "--guidance-scale", "-1e3"]) == 2
    assert "guidance scale must be in [0, 100] (got -1000.0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a flag's name is still a flag: a missing value is still said so
        build_parser().parse_args(["generate", "--prompt", "x", "--pre-scale", "--steps", "3"])


# ------------------------------------------------------------------------------- errors naming the user's path


@pytest.fixture(params=["permissions", "simulated"])
def read_only(request, tmp_path, monkeypatch):
    """A folder where nothing can be created: by its permissions (not for root, who ignores them), or with
    mkstemp failing as it does there (EACCES naming the temporary file it tried)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if request.param == "permissions":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):  # noqa: A002 (tempfile's own names)
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}k3j5l2x8{suffix}"))
        return real(suffix, prefix, dir, text)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield folder


def test_generate_and_detect_name_the_file_asked_for(read_only, tiny_onnx_dir, tmp_path, capsys):
    """'cannot read or write …/.x.png.mpiiufrm.tmp': the user never named that file."""
    out = read_only / "x.png"
    assert cli_main(["generate", "--model", str(tiny_onnx_dir), "--prompt", "a red cat", "--steps", "1",
                     "--threads", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"basinguard generate: error: cannot read or write {out}: Permission denied\n", err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue dog\n")
    calibration = read_only / "c.json"
    assert cli_main(["detect", "--model", str(tiny_onnx_dir), "--steps", "2", "--threads", "1", "--calibrate",
                     "--memorized", str(prompts), "--normal", str(prompts), "--out", str(calibration)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"basinguard detect: error: cannot read or write {calibration}: Permission denied", err
    assert list(read_only.iterdir()) == []


def test_export_names_the_folder_asked_for(read_only, tiny_sd_pipeline_dir, capsys):
    """'.exp.partial-…lock': export's lock file, not the OUT given."""
    out = read_only / "exp"
    assert cli_main(["export", str(tiny_sd_pipeline_dir), str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"basinguard export: error: cannot write {out}: Permission denied", err
    assert list(read_only.iterdir()) == []


def test_a_failed_rename_names_the_file_asked_for(tmp_path, monkeypatch):
    """os.replace's error names the temporary file first; the caller asked for `target`."""
    target = tmp_path / "x.json"

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError) as info:
        write_atomic(target, b"{}")
    assert info.value.filename == str(target) and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- start-up


GENERATE_AND_SAY_IF_ONNX = (
    "import sys; from basinguard.cli import main\n"
    "rc = main(['generate', '--model', sys.argv[1], '--prompt', 'a red square', '--steps', '3', '--threads', '1', "
    "'--out', sys.argv[2]])\n"
    "print('onnx imported' if 'onnx' in sys.modules else 'no onnx'); sys.exit(rc)\n")


def test_a_warm_start_imports_no_onnx_and_makes_the_same_image(tmp_path):
    """`import onnx` (1.6 s of a 2.7 s generate) was paid on every load for the attention fusion; the fused graph
    is now cached, keyed by the model file's content, so a second run reads it without onnx."""
    model = copy_model(SHIPPED, tmp_path / "model")
    env = {"BASINGUARD_CACHE_DIR": str(tmp_path / "cache")}
    cold = run_python(GENERATE_AND_SAY_IF_ONNX, str(model), str(tmp_path / "cold.npy"), env=env)
    warm = run_python(GENERATE_AND_SAY_IF_ONNX, str(model), str(tmp_path / "warm.npy"), env=env)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    assert cold.stdout.splitlines()[-1] == "onnx imported"  # the first run fuses (and this test could fail)
    assert warm.stdout.splitlines()[-1] == "no onnx"
    np.testing.assert_array_equal(np.load(tmp_path / "warm.npy"), np.load(tmp_path / "cold.npy"))
    # the model folder is left as it was: a model holding its own weights is fused into the user cache dir
    assert not list(model.rglob("*.fused.onnx"))


def test_a_changed_model_file_is_fused_again_whatever_its_timestamps(tmp_path):
    """The cache is keyed by the file's content (its sha256, remembered per size, mtime, ctime and inode): a model
    replaced by another with older timestamps (cp -p, rsync -a) runs as itself."""
    from test_fusion import attention_graph, numpy_attention, qkv

    path = tmp_path / "attention.onnx"
    onnx.save(attention_graph(0.3, masked=False, key_two_transposes=False, heads=2, head_dim=3), str(path))
    feed = qkv(7)
    first = OrtModel(path, threads=1)
    assert first.fused_attention == 1
    np.testing.assert_allclose(first.run(feed)["out"], numpy_attention(*feed.values(), 2, 0.3), rtol=1e-5, atol=1e-6)
    stamp = path.stat().st_mtime_ns
    onnx.save(attention_graph(0.3, masked=False, key_two_transposes=False, heads=3, head_dim=2), str(path))
    os.utime(path, ns=(stamp - 10**10, stamp - 10**10))
    second = OrtModel(path, threads=1)
    assert second.fused_attention == 1
    np.testing.assert_allclose(second.run(feed)["out"], numpy_attention(*feed.values(), 3, 0.3), rtol=1e-5, atol=1e-6)
