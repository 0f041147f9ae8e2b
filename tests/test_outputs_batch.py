"""`basinguard batch` writing shards and provenance (basinguard.batch with basinguard.outputs), on the shipped model:
WebDataset and parquet shards read by their own libraries, image formats, exactly-once across a SIGKILL of the real
command, the manifest naming each image's shard, one output format per OUT_DIR, and Ray workers' shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from basinguard.cli import SHIPPED_MODEL
from basinguard.cli import main as cli_main
from basinguard.outputs.shards import shard_keys

ROOT = Path(__file__).resolve().parent.parent
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PROMPTS = "a red circle\na blue square, small\na green triangle on the left\n"
STEPS = ["--steps", "4", "--threads", "1", "--no-progress"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def ids(lines: int, per_line: int) -> list[str]:
    return [f"{line:06d}-{k:03d}" for line in range(1, lines + 1) for k in range(per_line)]


def tar_rows(out: Path) -> list[dict]:
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False)) if shards else []


def test_webdataset_batch_shards_carry_the_images_and_their_provenance(prompts, tmp_path, capsys):
    from PIL import Image

    from basinguard.runtime.model_folder import model_identity

    out = tmp_path / "out"
    args = ["batch", str(prompts), str(out), "--images-per-prompt", "3", "--output-format", "webdataset",
            "--shard-size", "4", *STEPS]
    assert cli_main(args) == 0
    assert "images: 9/9 done (9 this run" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-000-00000{k}.tar" for k in range(3)]
    rows = tar_rows(out)
    assert sorted(r["__key__"] for r in rows) == ids(3, 3)
    entries = {e["id"]: e for e in manifest(out)}
    identity = model_identity(SHIPPED_MODEL)
    for row in rows:
        entry = entries[row["__key__"]]
        assert row["__key__"] in shard_keys(out / entry["file"]) and entry["member"] == f"{row['__key__']}.png"
        trace = json.loads(row["json"])
        assert row["txt"].decode() == trace["prompt"] == entry["prompt"] and trace["seed"] == entry["seed"]
        with Image.open(io.BytesIO(row["png"])) as im:
            assert json.loads(im.text["basinguard"]) == trace
            assert f"Model hash: {identity['id']}, Model: shapes," in im.text["parameters"]
            assert im.getxmp()["xmpmeta"]["RDF"]["Description"]["DigitalSourceType"] == TRAINED
    # a restart has nothing left to do, and adds no shard
    assert cli_main(args) == 0
    assert "images: 9/9 done (0 this run, 9 already done)" in capsys.readouterr().out
    assert len(list(out.glob("shard-*"))) == 3


def test_parquet_batch_of_jpegs_read_by_datasets(prompts, tmp_path):
    import datasets
    import piexif
    import piexif.helper

    out = tmp_path / "out"
    assert cli_main(["batch", str(prompts), str(out), "--images-per-prompt", "2", "--output-format", "parquet",
                     "--image-format", "jpeg", "--quality", "80", "--provenance-prompt", *STEPS]) == 0
    files = sorted(str(p) for p in out.glob("shard-*.parquet"))
    assert len(files) == 1  # 6 images, the default shard size
    dataset = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf-cache"))
    entries = {e["id"]: e for e in manifest(out)}
    assert sorted(dataset["key"]) == ids(3, 2) and isinstance(dataset.features["image"], datasets.Image)
    for row in dataset:
        entry = entries[row["key"]]
        assert (row["prompt"], row["seed"], row["policy"]) == (entry["prompt"], entry["seed"], entry["policy"]["name"])
        assert json.loads(row["trace"])["gap"] == entry["gap"]
        image = row["image"]
        assert image.format == "JPEG" and image.getxmp()["xmpmeta"]["RDF"]["Description"]["AIPromptInformation"] == (
            entry["prompt"])
        comment = piexif.load(image.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
        assert piexif.helper.UserComment.load(comment).startswith(entry["prompt"] + "\nSteps: 4, ")


def test_files_batch_in_webp_without_provenance_resumes(prompts, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out"
    args = ["batch", str(prompts), str(out), "--image-format", "webp", "--no-provenance", *STEPS]
    assert cli_main(args) == 0
    assert sorted(p.name for p in out.glob("*.webp")) == [f"{i}.webp" for i in ids(3, 1)]
    assert [e["file"] for e in manifest(out)] == [f"{i}.webp" for i in ids(3, 1)]
    with Image.open(out / "000002-000.webp") as im:
        assert "exif" not in im.info and "DigitalSourceType" not in im.getxmp()["xmpmeta"]["RDF"]["Description"]
        before = np.asarray(im)
    (out / "000002-000.webp").unlink()
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "images: 3/3 done (1 this run, 2 already done)" in capsys.readouterr().out
    with Image.open(out / "000002-000.webp") as im:
        np.testing.assert_array_equal(np.asarray(im), before)
    assert len(manifest(out)) == 3


def test_one_output_format_per_out_dir_and_shard_size_needs_shards(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["batch", str(prompts), str(out), *STEPS]) == 0
    capsys.readouterr()
    assert cli_main(["batch", str(prompts), str(out), "--output-format", "webdataset", *STEPS]) == 2
    err = capsys.readouterr().err
    assert "holds --output-format files output" in err and err.count("\n") == 1
    assert not list(out.glob("shard-*"))
    assert cli_main(["batch", str(prompts), str(tmp_path / "o2"), "--shard-size", "5", *STEPS]) == 2
    assert "--shard-size applies to --output-format webdataset or parquet" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def run_batch_process(prompts: Path, out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "basinguard.cli", "batch", str(prompts), str(out), *STEPS,
                             "--batch-size", "1", "--images-per-prompt", "6", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_sigkilled_batch_resumes_to_each_image_exactly_once(prompts, tmp_path, output_format):
    """The real command killed (SIGKILL) once its first shards are out, twice, then run to the end: every image once
    across the shards, each the same as in an uninterrupted run, and the manifest naming the shard that holds it."""
    flags = ("--output-format", output_format, "--shard-size", "2")
    reference = tmp_path / "reference"
    assert run_batch_process(prompts, reference, *flags).wait() == 0
    out = tmp_path / "out"
    codes = []
    for shards_before_kill in (2, 5):
        process = run_batch_process(prompts, out, *flags)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if len(list(out.glob("shard-*"))) >= shards_before_kill:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        codes.append(process.wait())
    assert -signal.SIGKILL in codes  # at least one run was killed before its end
    assert run_batch_process(prompts, out, *flags).wait() == 0
    entries = manifest(out)
    assert sorted(e["id"] for e in entries) == ids(3, 6)  # each image once in the manifest
    held = [key for p in sorted(out.glob("shard-*")) for key in sorted(shard_keys(p))]
    assert sorted(held) == ids(3, 6)  # and once across the shards
    for entry in entries:
        assert entry["id"] in shard_keys(out / entry["file"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert {e["id"]: (e["seed"], e["gap"], e["transition_step"]) for e in entries} == {
        e["id"]: (e["seed"], e["gap"], e["transition_step"]) for e in manifest(reference)}


def test_ray_workers_write_their_own_shards_exactly_once(prompts, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert cli_main(["batch", str(prompts), str(out), "--images-per-prompt", "3", "--output-format", "webdataset",
                         "--shard-size", "2", *STEPS, "--ray", "--ray-workers", "2"]) == 0
    finally:
        ray.shutdown()
    names = sorted(p.name for p in out.glob("shard-*"))
    assert {name[:10] for name in names} == {"shard-000-", "shard-001-"}  # one series per worker
    assert sorted(r["__key__"] for r in tar_rows(out)) == ids(3, 3)
    entries = manifest(out)  # the workers' manifest parts, merged
    assert sorted(e["id"] for e in entries) == ids(3, 3) and not list(out.glob("manifest.part-*"))
    for entry in entries:
        assert entry["id"] in shard_keys(out / entry["file"])


def test_batch_signs_each_image_with_c2pa(prompts, tmp_path):
    c2pa = pytest.importorskip("c2pa", reason="C2PA signing needs c2pa-python (the c2pa extra)")
    from test_outputs import make_chain

    cert, key, _ = make_chain(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["batch", str(prompts), str(out), "--output-format", "webdataset", "--c2pa-cert", str(cert),
                     "--c2pa-key", str(key), *STEPS]) == 0
    rows = tar_rows(out)
    assert len(rows) == 3
    for row in rows:
        with c2pa.Reader("image/png", io.BytesIO(row["png"])) as reader:
            manifest = reader.get_active_manifest()
        assert manifest["title"] == f"{row['__key__']}.png"
        actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
        assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == TRAINED
