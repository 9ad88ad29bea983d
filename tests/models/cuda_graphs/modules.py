"""What the graphs' tests share: a small module (a convolution and a batch norm), and the
captures faked on the CPU."""
from torch import nn


class ConvBN(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def fake_captures(monkeypatch, graphs_module, capture: str, fake):
    """``fake`` in place of the class ``capture`` of ``graphs_module`` (``training`` or
    ``inference``), and every input taken for one on the GPU (no call eager for that alone);
    returns ``fake``."""
    monkeypatch.setattr(graphs_module, capture, fake)
    monkeypatch.setattr(graphs_module, 'eager_only', lambda inputs: False)
    return fake
