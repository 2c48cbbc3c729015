import numpy as np
import pytest

from transfer.davis.scoring import (
    DavisInputError,
    boundary_f_measure,
    boundary_map,
    boundary_radius,
    evaluate,
    region_similarity,
    score_sequence,
    statistics,
    write_csvs,
)

from .davis_fixtures import moving_ellipses, write_indexed, write_sequence


def _square(h=10, w=12, rows=(2, 6), cols=(2, 6)):
    m = np.zeros((1, h, w), bool)
    m[0, rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_region_similarity_by_hand():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    gt[0, 0, :4] = True
    pred[0, 0, 2:4] = pred[0, 1, 0:2] = True  # 2 shared pixels, union 6
    gt[2, 1, 1] = True  # frame 1: both empty -> 1; frame 2: prediction empty -> 0
    assert region_similarity(gt, pred).tolist() == pytest.approx([2 / 6, 1.0, 0.0])


def test_boundary_map_of_a_square_is_the_official_half_pixel_offset_ring():
    b = boundary_map(_square())[0]
    want = np.zeros((10, 12), bool)
    want[1:6, 1:6] = True
    want[2:5, 2:5] = False  # a 5x5 ring, offset up-left of the 4x4 square: 16 pixels
    assert np.array_equal(b, want)


def test_boundary_f_with_tolerance_1_and_2_by_hand():
    gt, pred = _square(), _square(cols=(4, 8))  # shifted right by 2 columns
    # tolerance 1 (a plus-shaped disk): 10 of the 16 ring pixels of each mask lie within reach of the other ring
    assert boundary_f_measure(gt, pred, bound_th=1)[0] == pytest.approx(10 / 16)
    # tolerance 2: every ring pixel is within reach
    assert boundary_f_measure(gt, pred, bound_th=2)[0] == pytest.approx(1.0)


def test_boundary_tolerance_follows_the_image_diagonal():
    assert boundary_radius(480, 854) == 8  # ceil(0.008 * 979.6)
    assert boundary_radius(10, 10) == 1
    assert boundary_radius(10, 10, bound_th=3) == 3


def test_boundary_f_of_empty_masks():
    empty, sq = np.zeros((1, 10, 12), bool), _square()
    assert boundary_f_measure(empty, empty)[0] == 1.0
    assert boundary_f_measure(sq, empty)[0] == 0.0  # precision 1, recall 0
    assert boundary_f_measure(empty, sq)[0] == 0.0


def test_statistics_mean_recall_decay_by_hand():
    m, r, d = statistics(np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]))
    # official bins for 8 frames: [0:3], [2:5], [4:6], [5:8]
    assert (m, r, d) == pytest.approx((0.55, 0.5, 0.8 - 0.3))
    m, r, d = statistics(np.ones(5))
    assert (m, r, d) == pytest.approx((1.0, 1.0, 0.0))


def _layout(tmp_path, gt_frames, pred_frames, name="seq"):
    write_sequence(tmp_path / "ann", name, gt_frames)
    write_sequence(tmp_path / "pred", name, pred_frames)
    return tmp_path / "ann", tmp_path / "pred"


def test_void_is_background_and_missing_objects_score_as_empty(tmp_path):
    gt = np.zeros((8, 8), np.uint8)
    gt[1:3, 1:3] = 1  # 4 pixels of object 1
    gt[5:7, 5:7] = 2  # 4 pixels of object 2
    gt[0, 4:8] = 255  # void: background for the semi-supervised protocol
    pred = np.zeros_like(gt)
    pred[1:3, 1:3] = 1
    pred[0, 4:8] = 1  # object 1 also claims the void pixels; object 2 is never predicted
    ann, prd = _layout(tmp_path, [gt] * 4, [pred] * 4)
    s = score_sequence(ann, prd, "seq")
    assert s.j.shape == (2, 2)  # two objects, frames 1 and 2 (first and last excluded)
    assert s.j[0].tolist() == pytest.approx([4 / 8, 4 / 8])
    assert s.j[1].tolist() == [0.0, 0.0] and s.f[1].tolist() == [0.0, 0.0]


def test_evaluate_writes_the_official_csvs(tmp_path):
    frames = moving_ellipses(40, 60, 6, 2, np.random.default_rng(0))
    ann, prd = _layout(tmp_path, frames, frames)
    result = evaluate(ann, prd, ["seq"])
    assert result["metrics"] == pytest.approx({"J&F-Mean": 1, "J-Mean": 1, "J-Recall": 1, "J-Decay": 0,
                                               "F-Mean": 1, "F-Recall": 1, "F-Decay": 0})
    assert set(result["per_object"]) == {"seq_1", "seq_2"}
    g, s = write_csvs(result, tmp_path)
    assert g.read_text() == ("J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
                             "1.000,1.000,1.000,0.000,1.000,1.000,0.000\n")
    assert s.read_text() == "Sequence,J-Mean,F-Mean\nseq_1,1.000,1.000\nseq_2,1.000,1.000\n"
    assert s.name == "per-sequence_results-val.csv"


def test_bad_predictions_fail_with_one_line_naming_the_file(tmp_path):
    frames = moving_ellipses(40, 60, 5, 1, np.random.default_rng(0))
    ann, prd = _layout(tmp_path, frames, frames)
    (prd / "seq" / "00002.png").unlink()
    with pytest.raises(DavisInputError, match=r"00002.png: prediction is missing"):
        score_sequence(ann, prd, "seq")
    write_indexed(prd / "seq" / "00002.png", np.zeros((30, 60), np.uint8))
    with pytest.raises(DavisInputError, match=r"00002.png: prediction is 60x30, the annotation is 60x40"):
        score_sequence(ann, prd, "seq")
    from PIL import Image
    Image.new("RGB", (60, 40)).save(prd / "seq" / "00002.png")
    with pytest.raises(DavisInputError, match=r"00002.png: prediction must be an indexed \(palette\) PNG"):
        score_sequence(ann, prd, "seq")
    write_indexed(prd / "seq" / "00002.png", np.full((40, 60), 3, np.uint8))
    with pytest.raises(DavisInputError, match=r"object id 3 but seq has 1 objects"):
        score_sequence(ann, prd, "seq")


def test_parity_with_vos_benchmark(tmp_path):
    """vos-benchmark (PyPI) reproduces the official J-Mean and F-Mean; ours must equal every number it computes to
    1e-6: the global J&F, J and F and each object's J and F (it computes no Recall or Decay; those are checked by
    hand in test_statistics_mean_recall_decay_by_hand)."""
    from vos_benchmark.benchmark import benchmark

    rng = np.random.default_rng(0)
    names = []
    for i, (h, w, n_obj) in enumerate([(240, 427, 1), (180, 320, 2), (200, 200, 3)]):
        gt = moving_ellipses(h, w, 9, n_obj, rng)
        # predictions: the ground truth jittered, with one object sometimes dropped and noise blobs added
        pred = moving_ellipses(h, w, 9, n_obj, np.random.default_rng(i), jitter=3)
        pred = [np.where(rng.random(p.shape) < 0.002, rng.integers(0, n_obj + 1), p).astype(np.uint8) for p in pred]
        pred = [np.where(g > 0, g, p) if t % 3 else p for t, (g, p) in enumerate(zip(gt, pred))]
        name = f"seq{i}"
        write_sequence(tmp_path / "ann", name, gt)
        write_sequence(tmp_path / "pred", name, pred)
        names.append(name)
    result = evaluate(tmp_path / "ann", tmp_path / "pred", names)
    ours = result["per_object"]
    (jf,), (j,), (f,), (theirs,) = benchmark([str(tmp_path / "ann")], [str(tmp_path / "pred")], num_processes=1,
                                             verbose=False)
    assert result["metrics"]["J&F-Mean"] * 100 == pytest.approx(jf, abs=1e-6)
    assert result["metrics"]["J-Mean"] * 100 == pytest.approx(j, abs=1e-6)
    assert result["metrics"]["F-Mean"] * 100 == pytest.approx(f, abs=1e-6)
    compared = 0
    for name, (iou, bf) in theirs.items():
        for obj in iou:
            assert ours[f"{name}_{obj}"]["J-Mean"] * 100 == pytest.approx(iou[obj], abs=1e-6)
            assert ours[f"{name}_{obj}"]["F-Mean"] * 100 == pytest.approx(bf[obj], abs=1e-6)
            compared += 1
    assert compared == 6 == len(ours)
