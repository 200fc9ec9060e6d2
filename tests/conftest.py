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


def batch_and_other(model: torch.nn.Module, features: int = 8, classes: int = 4, n: int = 32):
    """A seeded batch ``(x, y)`` of ``n`` vectors and another parameter state near the model's
    (each parameter plus 0.3 · N(0, 1)): the inputs of an ``averaged_grad`` check."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)
    other = {name: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    return x, y, other


@pytest.fixture
def fresh_ttadapt_warnings():
    """ttadapt warns once per process about a custom autograd.Function, an ATen op or a
    TorchScript module: forget what it has warned about, before and after the test."""
    from ttadapt import unseen

    for seen in (unseen.WARNED, unseen.WARNED_SCRIPTS):
        seen.clear()
    yield
    for seen in (unseen.WARNED, unseen.WARNED_SCRIPTS):
        seen.clear()
