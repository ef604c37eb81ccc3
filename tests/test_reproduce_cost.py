"""The FLOP count behind the paper presets' cost estimate, against ResNet-20's count by hand."""

import pytest

from hf_zsharp.reproduce.cost import ModelCost, count_flops, last_value, run_flops

# CIFAR ResNet-20 at 32x32, multiply-adds: stem conv 3->16 (442,368), six 16->16 convs at 32x32 (6 x 2,359,296),
# a strided 16->32 conv (1,179,648) and five 32->32 convs at 16x16 (5 x 2,359,296), the same at 8x8 for 64
# channels (1,179,648 + 5 x 2,359,296), the classifier 64->10 (640); option-A shortcuts have none.
RESNET20_MACS = 442_368 + 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296) + 640


def test_resnet20_flops_are_counted_exactly():
    cost = count_flops("resnet20", 10, 32)
    assert cost.forward == 2 * RESNET20_MACS
    # Backward: twice the forward, less the stem's input gradient (the images need none).
    assert cost.forward_backward == 3 * 2 * RESNET20_MACS - 2 * 442_368


def test_run_flops_count_training_and_validation():
    cost = ModelCost("m", forward=1.0, forward_backward=3.0)
    # 10 epochs of 900 training images (two passes of 3) and 100 validation images (one forward).
    assert run_flops(cost, 1000, 10, two_pass=True) == pytest.approx(10 * (900 * 6 + 100))
    assert run_flops(cost, 1000, 10, two_pass=False) == pytest.approx(10 * (900 * 3 + 100))
    assert last_value(["--image_size", "32", "--x", "1", "--image_size", "64"], "--image_size") == "64"
