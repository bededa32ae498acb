"""The BatchNorm input shapes the benchmarks use, derived from ResNet-50's architecture."""

# ResNet-50 (torchvision's v1.5: the stride sits on the 3x3 conv) at 224x224: (planes, blocks, output size)
# per stage. The stem's BN sees (64, 112x112).
RESNET50_STAGES = ((64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7))

# Extra shapes: BatchNorm1d on (N, C), and few channels over a long spatial extent, where per-channel
# parallelism alone cannot fill the machine.
BN1D_SHAPE = (4096, 1024)
SMALL_C_SHAPE = (20, 6, 65536)


def resnet50_bn_shapes(batch):
    """{(N, C, H, W): number of BN layers with that input} for ResNet-50 at 224x224, in network order."""
    counts = {(batch, 64, 112, 112): 1}

    def add(c, hw):
        key = (batch, c, hw, hw)
        counts[key] = counts.get(key, 0) + 1

    in_size = 56
    for planes, blocks, size in RESNET50_STAGES:
        for block in range(blocks):
            add(planes, in_size if block == 0 else size)  # bn1, before the strided conv
            add(planes, size)  # bn2
            add(4 * planes, size)  # bn3
            if block == 0:
                add(4 * planes, size)  # the downsample branch's BN
        in_size = size
    return counts


def parse_shape(text):
    """'32x256x56x56' -> (32, 256, 56, 56)."""
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 32x256x56x56") from None
    if len(shape) < 2:
        raise ValueError(f"bad shape {text!r}: BatchNorm needs at least (N, C)")
    return shape


def shape_str(shape):
    return "x".join(str(d) for d in shape)
