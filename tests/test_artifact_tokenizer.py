"""Artifacts reference the tokenizer's file (with its sha256) instead of copying it; loading checks it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quantcore.api import load_generator, quantize_job
from quantcore.artifact import MODEL_FILE, TOKENIZER_FILE, load_artifact
from quantcore.checkpoint import file_sha256
from quantcore.errors import ArtifactError
from quantcore.zoo import TOKENIZER_WEIGHTS

SPEC = {
    "model": "tiny-llamagen",
    "recipe": "rtn",
    "a_bits": None,
    "calibration": {"num_samples": 2, "batch_size": 2},
    "evaluation": {"num_images": 0},
}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "art"
    return out, quantize_job(SPEC, out)


def test_a_bundled_tokenizer_is_referenced_by_name_not_copied(bundled):
    out, manifest = bundled
    assert set(manifest["files"]) == {MODEL_FILE} and not (out / TOKENIZER_FILE).exists()
    assert manifest["tokenizer_weights"] == {
        "source": "bundled",
        "path": TOKENIZER_WEIGHTS.name,
        "sha256": file_sha256(TOKENIZER_WEIGHTS),
        "size": TOKENIZER_WEIGHTS.stat().st_size,
    }
    _, tokenizer, _ = load_artifact(out)
    expected = load_file(str(TOKENIZER_WEIGHTS))
    state = tokenizer.state_dict()
    shared = [k for k in expected if k in state]
    assert shared and all(torch.equal(state[k], expected[k].to(state[k].dtype)) for k in shared)
    images = load_generator(str(out)).generate([1, 2], [3, 4])
    assert images.shape[0] == 2


def test_a_tokenizer_file_is_referenced_by_path_and_its_hash_checked(tmp_path):
    mine = tmp_path / "my-tokenizer.safetensors"
    shutil.copyfile(TOKENIZER_WEIGHTS, mine)
    out = tmp_path / "art"
    manifest = quantize_job({**SPEC, "tokenizer_checkpoint": str(mine)}, out)
    assert manifest["tokenizer_weights"]["source"] == "file"
    assert manifest["tokenizer_weights"]["path"] == str(mine.resolve())
    load_artifact(out)

    data = bytearray(mine.read_bytes())
    data[-1] ^= 0xFF
    mine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="not the file the artifact was made with"):
        load_artifact(out)
    mine.unlink()
    with pytest.raises(ArtifactError, match="missing on this machine"):
        load_artifact(out)


def test_a_random_tokenizer_is_still_stored(tmp_path):
    manifest = quantize_job({**SPEC, "model": "llamagen-tiny"}, tmp_path / "art")
    assert TOKENIZER_FILE in manifest["files"] and "tokenizer_weights" not in manifest
    load_artifact(tmp_path / "art")


def test_a_tampered_reference_is_refused(bundled, tmp_path):
    out, _ = bundled
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer_weights"]["path"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unsafe bundled tokenizer name"):
        load_artifact(copy)
