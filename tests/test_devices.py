"""resolve_device: one reading of a device setting for training and embedding."""

import pytest
import torch

from mmv.devices import resolve_device


@pytest.mark.parametrize("setting", [None, "auto"])
def test_none_and_auto_give_cuda_where_there_is_one_else_the_cpu(setting):
    assert resolve_device(setting) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_a_named_device_is_taken_as_it_is():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("setting", ["gpu0", 3.5])
def test_a_setting_that_names_no_device_is_a_value_error_naming_the_argument(setting):
    with pytest.raises(ValueError, match=r"run\.device must be 'auto' or a torch device"):
        resolve_device(setting, "run.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_where_there_is_none_is_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"run\.device 'cuda' was asked for, but CUDA is not available"):
        resolve_device("cuda", "run.device")
