"""The shared convolutional layers: the backbone whose features the RPN and the Fast
R-CNN head both read.

The paper shares the conv layers of VGG-16 or ZF (stride 16) between the two networks.
Shapes images are 128x128 with objects drawn at 12 to 64 pixels, so a much smaller stack
suffices: 3x3 convolutions (padding 1) with ReLU, and 2x2 max pools after the first
three, give a stride-8 feature map (16x16 for a 128x128 image) whose cells see about
40 pixels, the size of a typical object. Its layers are the ones of chapter 1.
"""

from .layers import Conv2d, MaxPool2d, ReLU, Sequential

BACKBONE_STRIDE = 8


def make_backbone(channels=(16, 32, 64, 64), rng=None):
    """3x3 conv + ReLU per entry of ``channels``, a 2x2 max pool after each of the first
    three: (N, 3, H, W) -> (N, channels[-1], H // 8, W // 8)."""
    if len(channels) < 4:
        raise ValueError(f"make_backbone: channels needs at least 4 entries (three pools), got {channels!r}")
    layers = []
    in_ch = 3
    for i, out_ch in enumerate(channels):
        # the images need no gradient, so the first conv skips dL/dx
        layers += [Conv2d(in_ch, out_ch, 3, padding=1, rng=rng, needs_input_grad=i > 0), ReLU()]
        if i < 3:
            layers.append(MaxPool2d(2))
        in_ch = out_ch
    return Sequential(*layers)
