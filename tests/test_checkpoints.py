import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_llamagen
from quantcore.checkpoint import read_state_dict
from quantcore.errors import CheckpointError
from quantcore.registry import load_model


@pytest.fixture
def official_state():
    return {k: v.clone() for k, v in random_llamagen("par-tiny", seed=3).state_dict().items()}


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_official_pt_layout_loads_strictly(tmp_path, official_state, wrapper):
    path = tmp_path / "PAR-tiny.pt"
    torch.save({wrapper: official_state, "epoch": 3} if wrapper else official_state, path)
    model = load_model("par-tiny", path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, official_state[k])


def test_safetensors_loads(tmp_path, official_state):
    path = tmp_path / "m.safetensors"
    save_file(official_state, str(path))
    model = load_model("par-tiny", path)
    assert torch.equal(model.output.weight, official_state["output.weight"])


def test_missing_key_is_named(tmp_path, official_state):
    del official_state["layers.1.feed_forward.w3.weight"]
    torch.save({"model": official_state}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"1 missing: layers\.1\.feed_forward\.w3\.weight"):
        load_model("par-tiny", tmp_path / "c.pt")


def test_unexpected_key_is_named_and_fitting_config_suggested(tmp_path, official_state):
    # a raster LlamaGen file has no special-token table: loading it as PAR names the key,
    # loading a PAR file as raster LlamaGen names the extra key and suggests the PAR config
    torch.save({"model": official_state}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"unexpected: spe_tok_embeddings.*fit: par-tiny"):
        load_model("llamagen-tiny", tmp_path / "c.pt")


def test_wrong_shape_is_named(tmp_path, official_state):
    official_state["norm.weight"] = torch.ones(65)
    torch.save({"model": official_state}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"wrong shape: norm\.weight: file \(65,\) vs model \(64,\)"):
        load_model("par-tiny", tmp_path / "c.pt")


class _Payload:
    """Unpickling this would run os.system: the weights-only loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/ptq4arvg_pwned",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = "/tmp/ptq4arvg_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="not a plain tensor dict"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def _training_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpt-model", default="GPT-B")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mixed-precision", choices=["none", "bf16"], default="bf16")
    parser.add_argument("--results-dir", default=None)
    return parser.parse_args(["--lr", "3e-4"])


@pytest.mark.parametrize("zip_format", [True, False])
def test_official_training_checkpoint_loads_weights_only(tmp_path, zip_format):
    # what LlamaGen/PAR's train_c2i.py writes: model, AdamW state after a step, steps, argparse args
    model = random_llamagen("par-tiny", seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.sequence_logits(torch.tensor([1]), torch.zeros(1, 16, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "0010000.pt"
    checkpoint = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "steps": 10000,
        "args": _training_args(),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    assert read_state_dict(path).keys() == state.keys()  # the optimizer's tensors are not among them
    loaded = load_model("par-tiny", path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k])


class _ArgsWithHook(argparse.Namespace):
    """A Namespace subclass whose unpickling would run os.system: a different global, so refused."""

    def __setstate__(self, state):
        os.system("touch /tmp/ptq4arvg_pwned")


class _Args:
    def __init__(self):
        self.lr = 1e-4


@pytest.mark.parametrize(
    "args", [_Payload(), _ArgsWithHook(lr=1e-4), _Args()], ids=["reduce", "subclass", "plain"]
)
def test_only_namespace_is_let_through(tmp_path, official_state, args):
    marker = "/tmp/ptq4arvg_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "c.pt"
    torch.save({"model": official_state, "steps": 1, "args": args}, path)
    with pytest.raises(CheckpointError, match="not a plain tensor dict"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(2), "note": "hello"}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not tensors: \\['note'\\]"):
        read_state_dict(tmp_path / "c.pt")


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read|not a plain"):
        read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
