import pytest
import torch

from kvseg.config import ModelConfig
from kvseg.models.unet import UNet, build_model


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize(("depth", "shape"), [(3, (2, 3, 32, 48)), (4, (1, 3, 64, 64))])
def test_output_is_one_logit_channel_at_input_size(upsample: str, depth: int, shape: tuple[int, ...]) -> None:
    model = UNet(base_channels=8, depth=depth, upsample=upsample).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 1, shape[2], shape[3])
    assert out.dtype == torch.float32


def test_size_not_divisible_is_a_clear_error() -> None:
    model = UNet(base_channels=8, depth=4)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 40, 64))


def test_width_and_depth_follow_the_config() -> None:
    small = build_model(ModelConfig(base_channels=8, depth=3))
    large = build_model(ModelConfig(base_channels=16, depth=4))
    assert len(small.downs) == 3 and len(large.downs) == 4
    assert small.stem[0].out_channels == 8 and large.downs[-1][1][0].out_channels == 256
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(large) > 4 * count(small)


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_forward_traces_as_one_graph() -> None:
    # torch.compile and the ONNX exporter need a forward without graph breaks.
    model = UNet(base_channels=8, depth=3).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
