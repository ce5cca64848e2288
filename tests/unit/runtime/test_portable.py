"""runtime.portable's reader: pieces of optimizer state from several rank files reassemble by offset, reading only the
slices asked for, and a parameter the checkpoint lacks or has in another shape is refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from runtime.portable import CheckpointMismatch, PortableReader


@pytest.fixture
def reader(tmp_path) -> PortableReader:
    state = torch.arange(10, dtype=torch.float32)
    # a ZeRO-1 bucket over 2 holders: rank 0 holds elements [0, 6) of w's state, rank 1 [6, 10)
    files = [{"p:m/0/w": torch.ones(2, 5), "o:exp_avg@0:m/0/w": state[:6].clone(), "s:step:m/0/w": torch.tensor(3.0)},
             {"o:exp_avg@6:m/0/w": state[6:].clone()}]
    index = {}
    for rank, tensors in enumerate(files):
        save_file(tensors, tmp_path / f"rank_{rank}.safetensors")
        index.update({k: {"file": f"rank_{rank}.safetensors", "shape": list(t.shape)} for k, t in tensors.items()})
    return PortableReader(tmp_path, index, "ckpt/step_2")


def test_state_reassembles_from_slices_of_every_file(reader):
    assert reader.state_names == ["exp_avg"]
    assert torch.equal(reader.whole_state("exp_avg", "m/0/w"), torch.arange(10, dtype=torch.float32).reshape(2, 5))
    reader.tensors_read = 0
    assert torch.equal(reader.state_range("exp_avg", "m/0/w", 7, 9), torch.tensor([7.0, 8.0]))
    assert reader.tensors_read == 1  # only the piece that holds [7, 9)
    assert float(reader.scalar("step", "m/0/w")) == 3.0 and reader.state_range("exp_avg_sq", "m/0/w", 0, 2) is None


def test_another_jobs_checkpoint_is_refused_in_one_line(reader):
    assert reader.param("m/0/w", (2, 5)).sum() == 10
    with pytest.raises(CheckpointMismatch, match=r"^ckpt/step_2: has no parameter 'm/1/w': it was written by another "
                                                 r"job") as missing:
        reader.param("m/1/w", (2, 5))
    with pytest.raises(CheckpointMismatch,
                       match=r"parameter 'm/0/w' has shape \(2, 5\), this job's is \(4, 5\)") as shape:
        reader.param("m/0/w", (4, 5))
    assert "\n" not in str(missing.value) + str(shape.value)
