from moemix.layers.dispatch import choose_layout


def test_auto_rule_cpu():
    assert choose_layout([16] * 64) == "padded"           # few rows per expert, balanced
    assert choose_layout([512] * 64) == "loop"            # many rows per expert
    assert choose_layout([100, 1, 1, 1]) == "sorted"      # few rows, but padding would more than double them
    assert choose_layout([1000, 300, 200, 100]) == "loop"
    assert choose_layout([16] * 64, num_dropped=3) == "loop"
    assert choose_layout([0, 0]) == "loop"


def test_auto_rule_cuda():
    assert choose_layout([512] * 64, device_type="cuda") == "padded"
    assert choose_layout([1000, 1, 1, 1, 1, 1, 1, 1], device_type="cuda") == "sorted"
    assert choose_layout([16] * 4, num_dropped=1, device_type="cuda") == "sorted"
