"""A small module for the graphs' tests: a convolution and a batch norm."""
from torch import nn


class ConvBN(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
