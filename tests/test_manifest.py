import hashlib
import io
import json

import pytest

from distillkit.errors import ModelError, OutputError
from distillkit.manifest import (
    MANIFEST_NAME,
    Manifest,
    atomic_artifact,
    check_output,
    finalize_artifact,
    read_source,
    sha256_file,
    weight_hashes,
)


def _artifact(tmp_path, name="a", stage="distill", history=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    m = Manifest(stage=stage, path=str(d), history=history or [])
    finalize_artifact(d, m, d)
    return d, m


def test_manifest_round_trip_and_hashes(tmp_path):
    d, m = _artifact(tmp_path)
    data = json.loads((d / MANIFEST_NAME).read_text())
    back = Manifest.from_dict(data)
    assert back.to_dict() == m.to_dict()
    assert back.files == {"model.safetensors": sha256_file(d / "model.safetensors")}
    assert back.files["model.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    assert weight_hashes(d) == back.files
    card = (d / "README.md").read_text()
    assert "distill" in card and "Lineage" in card


def test_read_source_kinds(tmp_path):
    d, m = _artifact(tmp_path)
    assert read_source(str(d)).kind == "artifact"
    assert read_source(str(d / MANIFEST_NAME)).manifest.stage == "distill"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert read_source(str(plain)).kind == "model_dir"
    assert read_source("org/model").kind == "hub"
    with pytest.raises(ModelError, match="does not exist"):
        read_source(str(tmp_path / "missing" / "deeper"))
    with pytest.raises(ModelError, match="does not exist"):
        read_source("./nope")


def test_read_source_from_stdin_json_and_quiet_path(tmp_path):
    d, m = _artifact(tmp_path)
    src = read_source("-", stdin=io.StringIO("log noise\n" + m.to_json_line() + "\n"))
    assert src.kind == "artifact" and src.path == m.path and src.manifest.stage == "distill"
    src = read_source("-", stdin=io.StringIO(str(d) + "\n"))
    assert src.path == str(d.resolve())
    with pytest.raises(ModelError, match="empty"):
        read_source("-", stdin=io.StringIO(""))


def test_lineage_accumulates(tmp_path):
    d1, m1 = _artifact(tmp_path, "one", "search-student")
    d2, m2 = _artifact(tmp_path, "two", "distill", history=m1.lineage())
    assert [h["stage"] for h in m2.lineage()] == ["search-student", "distill"]
    assert "history" not in m2.lineage()[0]


def test_atomic_artifact_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_artifact(out) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_artifact_overwrite_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_artifact(out) as tmp:
        (tmp / "v").write_text("1")
        finalize_artifact(tmp, Manifest(stage="distill", path=str(out)), out)  # only an artifact may be replaced
    with pytest.raises(OutputError, match="already exists"):
        check_output(out, overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_artifact(out, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError
    assert (out / "v").read_text() == "1"
    with atomic_artifact(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(OutputError, match="cannot write"):
            check_output(ro / "out", overwrite=False)
    finally:
        ro.chmod(0o700)
