"""Class-balanced subsets, the held-out split and SimCLR split files."""
import pytest

from transfer.classification.splits import balanced_subset, holdout_split, read_split_file

TARGETS = [0] * 100 + [1] * 37 + [2] * 3


def test_balanced_subset_takes_the_fraction_of_every_class_deterministically():
    idx = balanced_subset(TARGETS, 0.1, seed=0)
    per_class = [sum(TARGETS[i] == c for i in idx) for c in range(3)]
    assert per_class == [10, 4, 1]  # round(10), round(3.7), at least one
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert balanced_subset(TARGETS, 0.1, seed=0) == idx
    assert balanced_subset(TARGETS, 0.1, seed=1) != idx
    assert balanced_subset(TARGETS, 1.0, seed=0) == list(range(len(TARGETS)))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        balanced_subset(TARGETS, 0.0, seed=0)


def test_holdout_split_is_a_partition_that_keeps_every_class_in_training():
    targets = [*TARGETS, 3]  # a class with a single image
    train, held = holdout_split(targets, 0.1, seed=0)
    assert sorted(train + held) == list(range(len(targets))) and not set(train) & set(held)
    assert {targets[i] for i in train} == {0, 1, 2, 3}
    assert [sum(targets[i] == c for i in held) for c in range(4)] == [10, 4, 1, 0]
    assert holdout_split(targets, 0.1, seed=0) == (train, held)
    assert holdout_split(targets, 0.0, seed=0) == (list(range(len(targets))), [])  # nothing held out


def _samples(root):
    classes = {"n01440764": 0, "n01443537": 1}
    samples = []
    for cls, label in classes.items():
        for k in range(3):
            path = root / cls / f"{cls}_{k}.JPEG"
            samples.append((str(path), label))
    return samples, classes


def test_split_file_names_images_by_class_prefix(tmp_path):
    samples, classes = _samples(tmp_path)
    split = tmp_path / "1percent.txt"
    split.write_text("n01443537_2.JPEG\n\nn01440764_0.JPEG\n  n01440764_1.JPEG  \n")
    assert read_split_file(split, samples, classes) == [0, 1, 5]


def test_split_file_errors_name_the_problem(tmp_path):
    samples, classes = _samples(tmp_path)
    with pytest.raises(FileNotFoundError, match="--split-file .*nope.txt does not exist"):
        read_split_file(tmp_path / "nope.txt", samples, classes)
    split = tmp_path / "s.txt"
    split.write_text("n01440764_0.JPEG\nn01440764_9.JPEG\nn01443537_7.JPEG\n")
    with pytest.raises(FileNotFoundError, match="names 2 images missing .* n01440764_9.JPEG, n01443537_7.JPEG"):
        read_split_file(split, samples, classes)
    split.write_text("n09999999_1.JPEG\n")
    with pytest.raises(ValueError, match="classes with no training folder: n09999999"):
        read_split_file(split, samples, classes)
    split.write_text("\n")
    with pytest.raises(ValueError, match="names no images"):
        read_split_file(split, samples, classes)
