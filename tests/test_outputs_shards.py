"""Dataset shards (basinguard.outputs.shards): WebDataset tar files the `webdataset` library reads, parquet files
pyarrow and Hugging Face `datasets` read, each published whole; and exactly-once across SIGKILL and resume."""

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

from basinguard.outputs import OutputError
from basinguard.outputs.images import encode_image
from basinguard.outputs.shards import (
    PublishedShard,
    Sample,
    recover_shards,
    shard_keys,
    shard_writer,
)

ROOT = Path(__file__).resolve().parent.parent


def pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).random((8, 8, 3), dtype=np.float32)


def trace(i: int) -> dict:
    return {"prompt": f"prompt {i}, with a comma", "negative_prompt": "", "seed": 100 + i, "steps": 3,
            "scheduler": "ddim", "width": 8, "height": 8, "policy": {"name": "og-dtp", "guidance_scale": 7.5},
            "transition_step": None if i % 2 else i, "detection_score": None, "gap": [0.5, None, 0.25]}


def sample(i: int, fmt: str = "png") -> Sample:
    return Sample(f"{i:06d}-000", encode_image(pixels(i), trace(i), fmt), {"jpeg": "jpg"}.get(fmt, fmt), trace(i),
                  entry={"id": i})


def write(output_format: str, out: Path, count: int, shard_size: int, fmt: str = "png") -> list[PublishedShard]:
    published = []
    with shard_writer(output_format, out, shard_size) as writer:
        for i in range(count):
            if (shard := writer.add(sample(i, fmt))) is not None:
                published.append(shard)
        if (shard := writer.close()) is not None:
            published.append(shard)
    return published


def as_uint8(values: np.ndarray) -> np.ndarray:
    return (values * 255).round().astype(np.uint8)


def test_webdataset_shards_read_by_the_webdataset_library(tmp_path):
    import webdataset as wds
    from PIL import Image

    published = write("webdataset", tmp_path, 5, 2)
    assert [(p.name, [s.entry["id"] for s in p.samples]) for p in published] == [
        ("shard-000-000000.tar", [0, 1]), ("shard-000-000001.tar", [2, 3]), ("shard-000-000002.tar", [4])]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in published]  # nothing else left
    urls = [str(tmp_path / p.name) for p in published]
    rows = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in rows] == [f"{i:06d}-000" for i in range(5)]
    for i, row in enumerate(rows):
        assert json.loads(row["json"]) == trace(i) and row["txt"].decode() == trace(i)["prompt"]
        with Image.open(io.BytesIO(row["png"])) as im:
            np.testing.assert_array_equal(np.asarray(im), as_uint8(pixels(i)))
            assert json.loads(im.text["basinguard"]) == trace(i) and "parameters" in im.text  # the file's own metadata
    decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False).decode("pil")))
    assert decoded["png"].size == (8, 8) and decoded["json"] == trace(0)


def test_webdataset_jpeg_members(tmp_path):
    import webdataset as wds

    write("webdataset", tmp_path, 2, 10, fmt="jpeg")
    rows = list(wds.WebDataset([str(tmp_path / "shard-000-000000.tar")], shardshuffle=False, empty_check=False))
    assert [sorted(k for k in r if not k.startswith("__")) for r in rows] == [["jpg", "json", "txt"]] * 2


def test_parquet_shards_read_by_pyarrow_and_datasets(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    published = write("parquet", tmp_path, 70, 66)  # a full shard (two row groups) and a partial one
    assert [len(p.samples) for p in published] == [66, 4]
    files = [str(tmp_path / p.name) for p in published]
    table = pq.read_table(files[0])
    assert table.column("key").to_pylist()[:2] == ["000000-000", "000001-000"]
    assert table.column("seed").to_pylist()[:3] == [100, 101, 102]
    assert table.column("transition_step").to_pylist()[:3] == [0, None, 2]
    assert table.column("policy").to_pylist()[0] == "og-dtp" and table.column("guidance_scale").to_pylist()[0] == 7.5
    dataset = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(dataset.features["image"], datasets.Image) and len(dataset) == 70
    for i in (0, 69):
        row = dataset[i]
        np.testing.assert_array_equal(np.asarray(row["image"]), as_uint8(pixels(i)))
        assert row["prompt"] == trace(i)["prompt"] and json.loads(row["trace"]) == trace(i)
        assert row["image"].text["basinguard"] == json.dumps(trace(i), separators=(",", ":"))


def test_an_exception_discards_the_unpublished_shard(tmp_path):
    with pytest.raises(RuntimeError), shard_writer("webdataset", tmp_path, 10) as writer:
        writer.add(sample(0))
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_and_sizes_are_refused():
    with pytest.raises(OutputError, match="without '.'"):
        Sample("a.b", b"", "png", {})
    with pytest.raises(OutputError, match="--shard-size must be an integer >= 1"):
        shard_writer("webdataset", Path("/nonexistent"), 0)
    with pytest.raises(OutputError, match="--output-format must be one of files, webdataset, parquet"):
        shard_writer("zip", Path("/nonexistent"))


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_recovery_keeps_whole_recorded_shards_only(tmp_path, output_format):
    published = write(output_format, tmp_path, 6, 2)
    a, b, c = (p.name for p in published)
    keys = {p.name: {s.key for s in p.samples} for p in published}
    (tmp_path / f".{b}.abcd1234.tmp").write_bytes(b"half")  # a shard killed while being written
    # a: recorded whole; b: only one of its keys recorded (a torn manifest append); c: not recorded at all;
    # gone: recorded but deleted by a user
    recorded = {a: keys[a], b: {sorted(keys[b])[0]}, "shard-000-000009.tar": {"x-1", "x-2"}}
    lost = recover_shards(tmp_path, recorded)
    assert sorted(p.name for p in tmp_path.iterdir()) == [a]
    assert lost == {sorted(keys[b])[0], "x-1", "x-2"}
    assert shard_keys(tmp_path / a) == keys[a]
    # the next shard goes after the highest one left
    with shard_writer(output_format, tmp_path, 1) as writer:
        assert writer.add(sample(9)).name == b


# -------------------------------------------------------------------------------------------- kill and resume

JOB = '''
import json, os, signal, sys
from pathlib import Path
import numpy as np
from basinguard.files import write_atomic
from basinguard.outputs.images import encode_image
from basinguard.outputs.shards import Sample, recover_shards, shard_writer

out, output_format, count, kill = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
delay = float(os.environ.get("JOB_DELAY", "0"))
out.mkdir(exist_ok=True)
manifest = out / "manifest.jsonl"
# As a batch manifest is read on resume: a torn last line (no newline) is dropped.
lines = manifest.read_bytes().split(b"\\n")[:-1] if manifest.exists() else []
entries = [json.loads(line) for line in lines if line.strip()]
recorded = {}
for e in entries:
    recorded.setdefault(e["shard"], set()).add(e["key"])
lost = recover_shards(out, recorded)
entries = [e for e in entries if e["key"] not in lost]
write_atomic(manifest, "".join(json.dumps(e) + "\\n" for e in entries).encode())
done = {e["key"] for e in entries}
published = 0

def record(shard):
    global published
    published += 1
    data = "".join(json.dumps({"key": s.key, "shard": shard.name}) + "\\n" for s in shard.samples).encode()
    if kill == f"before-record:{published}":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(manifest, "ab") as f:
        if kill == f"torn-record:{published}":
            f.write(data[: len(data) // 2 + 3]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data); f.flush(); os.fsync(f.fileno())

with shard_writer(output_format, out, shard_size=3) as writer:
    for i in range(count):
        key = f"{i:06d}"
        if key in done:
            continue
        if kill == f"mid-shard:{i}":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(delay) if delay else None
        trace = {"prompt": f"prompt {i}", "seed": i}
        image = encode_image(np.full((8, 8, 3), i / count, np.float32), trace, "png")
        if (shard := writer.add(Sample(key, image, "png", trace))) is not None:
            record(shard)
    if (shard := writer.close()) is not None:
        record(shard)
'''.replace("import json, os,", "import json, os, time,")


def run_job(out: Path, output_format: str, count: int, kill: str = "", delay: float = 0.0,
            wait: bool = True) -> subprocess.Popen | int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "JOB_DELAY": str(delay)}
    process = subprocess.Popen([sys.executable, "-c", JOB, str(out), output_format, str(count), kill], env=env)
    return process.wait() if wait else process


def keys_in_shards(out: Path) -> list[str]:
    """Every key in every published shard, read by the format's own library (duplicates kept)."""
    shards = sorted(p for p in out.iterdir() if p.name.startswith("shard-"))
    if not shards:
        return []
    if shards[0].suffix == ".tar":
        import webdataset as wds

        return [row["__key__"] for row in wds.WebDataset([str(p) for p in shards], shardshuffle=False,
                                                        empty_check=False)]
    import pyarrow.parquet as pq

    return [key for p in shards for key in pq.read_table(p, columns=["key"]).column("key").to_pylist()]


def check_exactly_once(out: Path, count: int) -> None:
    expected = [f"{i:06d}" for i in range(count)]
    assert sorted(keys_in_shards(out)) == expected  # each key once, across all shards
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in entries) == expected
    for e in entries:  # the manifest names the shard that holds the key
        assert e["key"] in shard_keys(out / e["shard"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
@pytest.mark.parametrize("kill", ["mid-shard:4", "before-record:2", "torn-record:2"])
def test_sigkill_then_resume_makes_each_image_exactly_once(tmp_path, output_format, kill):
    out = tmp_path / "out"
    assert run_job(out, output_format, 8, kill) == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir())
    # the kill left what it interrupts: a temporary shard, a published but unrecorded shard, or a torn record
    assert any(name.endswith(".tmp") for name in left) or "shard-000-000001" in " ".join(left)
    assert run_job(out, output_format, 8) == 0
    check_exactly_once(out, 8)


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_sigkill_from_outside_at_any_moment_then_resume(tmp_path, output_format):
    """Killed by another process once its first shard is out, wherever it then is; resumed twice more so."""
    out = tmp_path / "out"
    for _ in range(2):
        process = run_job(out, output_format, 30, delay=0.01, wait=False)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            before = len(list(out.glob("shard-*"))) if out.is_dir() else 0
            time.sleep(0.02)
            if out.is_dir() and len(list(out.glob("shard-*"))) > before:
                break
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert run_job(out, output_format, 30) == 0
    check_exactly_once(out, 30)
