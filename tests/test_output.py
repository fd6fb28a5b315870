"""The reference's printed lines, to the character (../shared/REFERENCE.md gives each with a worked example)."""

import pytest
import torch
import torch.nn as nn

from cifar10_deepspeed import CLASSES, accuracy_lines, loss_line
from cifar10_deepspeed import test as evaluate


@pytest.mark.parametrize("epoch, batch, loss, line", [
    (1, 2000, 2.3041, "[ 1,  2000] loss:  2.304"),
    (12, 100, 0.5, "[ 12,   100] loss:  0.500"),
    (1, 50, 2.3084, "[ 1,    50] loss:  2.308"),
    (30, 3125, 0.0004, "[ 30,  3125] loss:  0.000"),  # the last batch of an epoch of CIFAR-10 on one rank
])
def test_loss_line(epoch, batch, loss, line):
    assert loss_line(epoch, batch, loss) == line


def counts(**per_class):
    """(correct, total) per class, in CLASSES order, from name=(correct, total); other classes 0 of 0."""
    pairs = [per_class.get(name, (0, 0)) for name in CLASSES]
    return [c for c, _ in pairs], [t for _, t in pairs]


def test_accuracy_lines_of_the_worked_example():
    others = {name: (1227, 1400) for name in ("bird", "cat", "deer", "dog", "frog", "ship")}
    correct, total = counts(plane=(71, 100), car=(0, 100), horse=(50, 100), truck=(1228, 1300), **others)
    assert (sum(correct), sum(total)) == (8711, 10000)
    lines = accuracy_lines(correct, total)
    assert lines[0] == "Accuracy of the network on the 10000 test images:  87 %"
    assert lines[1] == "Accuracy of plane :  71 %"
    assert lines[2] == "Accuracy of   car :  0 %"
    assert lines[8] == "Accuracy of horse :  50 %"
    assert len(lines) == 11


@pytest.mark.parametrize("right, of, printed", [
    (7, 8, " 88"),  # 87.5 %: half to even rounds up to 88
    (23, 200, " 12"),  # 11.5 %: up to 12
    (1, 8, " 12"),  # 12.5 %: down to 12
    (0, 5, " 0"),
    (5, 5, " 100"),
    (2, 3, " 67"),  # 66.7 %: rounded, where flooring would give 66
])
def test_accuracy_is_rounded_half_to_even_with_a_sign_space(right, of, printed):
    lines = accuracy_lines(*counts(plane=(right, of)))
    assert lines[0] == f"Accuracy of the network on the {of} test images: {printed} %"
    assert lines[1] == f"Accuracy of plane : {printed} %"


def test_class_names_are_right_aligned_in_five_characters():
    lines = accuracy_lines(*counts(**{name: (1, 2) for name in CLASSES}))
    assert lines[1:] == ["Accuracy of plane :  50 %", "Accuracy of   car :  50 %", "Accuracy of  bird :  50 %",
                         "Accuracy of   cat :  50 %", "Accuracy of  deer :  50 %", "Accuracy of   dog :  50 %",
                         "Accuracy of  frog :  50 %", "Accuracy of horse :  50 %", "Accuracy of  ship :  50 %",
                         "Accuracy of truck :  50 %"]


class AlwaysCar(nn.Module):
    def forward(self, x):
        return torch.eye(10)[1].repeat(len(x), 1)


def test_test_prints_the_block_for_a_short_last_batch_and_an_absent_class(single_rank_group, capsys):
    labels = [0, 0, 1, 1, 1, 2, 2]  # 7 images: the last batch of 4 holds 3; classes 3 to 9 have none
    testset = [(torch.zeros(3, 32, 32), label) for label in labels]
    accuracy = evaluate(AlwaysCar(), testset, "cpu", None)
    assert accuracy == pytest.approx(3 / 7)
    assert capsys.readouterr().out.splitlines() == [
        "Accuracy of the network on the 7 test images:  43 %",
        "Accuracy of plane :  0 %",
        "Accuracy of   car :  100 %",
        "Accuracy of  bird :  0 %",
        *(f"Accuracy of {name:>5s} : n/a (no test images)" for name in CLASSES[3:]),
    ]
