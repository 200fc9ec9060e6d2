import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both vanish)."""
    nb = b.norm().item()
    na = (a - b).norm().item()
    return na / nb if nb > 0 else na
