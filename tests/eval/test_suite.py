"""Suites: the paper plan, a small suite run end to end (table, report card), its bad input."""
import csv
import json

import pytest
import yaml

from eval.paper_table import table_rows
from eval.run import main
from eval.suite import load_suite, plan

from ..conftest import assert_one_line_error, make_digit_folders, tiny_args


def test_the_paper_plan_pretrains_then_evaluates_each_checkpoint(tmp_path):
    data = {"imagenet": "/data/in1k", "coco": "/data/coco", "ade20k": "/data/ade", "davis": "/data/davis"}
    steps = {s.name: s for s in plan(load_suite("paper"), tmp_path, data)}
    order = list(steps)
    assert len(steps) == 15 and {s.entry for s in steps.values()} == {"pretrain", "eval"}
    for name, s in steps.items():
        for need in s.needs:
            assert order.index(need) < order.index(name)
    knn = steps["knn_vit_small"]
    assert knn.needs == ["pretrain_vit_small"] and knn.profile.name == "gpu-1"
    assert knn.argv == ["--task", "knn", "--data", "/data/in1k", "--checkpoint",
                        str(tmp_path / "pretrain_vit_small" / "checkpoint.pth")]
    pre = steps["pretrain_vit_base"]
    assert pre.needs == [] and pre.profile.world_size == 16 and pre.argv[-2:] == ["--data", "/data/in1k/train"]
    assert steps["linear_vit_base"].argv[4:6] == ["--preset", "bam_vitb"]
    assert steps["coco_vit_base"].profile.tasks_per_node == 8
    for name in ("finetune_vit_base", "finetune_vit_small", "ade20k_vit_base", "linear_vit_base"):  # a full node
        assert (steps[name].profile.nodes, steps[name].profile.gpus_per_node, steps[name].profile.world_size) == \
            (1, 8, 8), name
    assert steps["semisup_vit_base"].sweep == [("fractions", ["0.01", "0.1"]),
                                               ("split_file", ["/data/in1k/1percent.txt", "/data/in1k/10percent.txt"])]
    overridden = plan(load_suite("paper"), tmp_path, data, overrides={"partition": "a100", "account": "lab"})
    assert {(s.profile.partition, s.profile.account) for s in overridden} == {("a100", "lab")}
    one = plan(load_suite("paper"), tmp_path, data, profile="gpu-1x8", overrides={"nodes": 2})
    assert {(s.profile.name, s.profile.world_size) for s in one} == {("gpu-1x8", 16)}


def test_the_dry_run_prints_jobs_resources_commands_and_dependencies(tmp_path, capsys):
    assert main(["--suite", "paper", "--dry-run", "--output-dir", str(tmp_path), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "15 steps, launcher slurm" in out
    assert "knn_vit_small  [gpu-1: partition=gpu nodes=1 tasks/node=1 gpus/node=1" in out
    assert "after: afterok:pretrain_vit_small" in out and "array of 2" in out
    assert "python pretrain/main.py --config" in out and "'{imagenet}/train'" in out  # not given: shown, not guessed
    assert "paper_table.md/.csv" in out and not list(tmp_path.iterdir())  # nothing submitted, nothing written


# Every published number of the paper table, transcribed from its source with the line it stands on:
# label: (value, source named in the suite, file in that source's repository or None for a paper, line, its text).
PUBLISHED = {
    "BAM ViT-B/16, linear top-1 (best validation epoch, as the official probe)":
        (78.1, "DanielShalam/BAM", "README.md", 15, "| ViT-B/16 | 85M | 78.1 |"),
    "BAM CAFormer-M36, linear top-1": (79.3, "DanielShalam/BAM", "README.md", 16, "| CAFormer-M36 | 57M | 79.3 |"),
    "DINO ViT-S/16, k-NN top-1 (reference)": (74.5, "DINO", "README.md", 26, "<td>74.5%</td>"),
    "DINO ViT-S/16, linear top-1 (reference)": (77.0, "DINO", "README.md", 27, "<td>77.0%</td>"),
    "DINO ViT-B/16, k-NN top-1 (reference)": (76.1, "DINO", "README.md", 50, "<td>76.1%</td>"),
    "DINO ViT-B/16, linear top-1 (reference)": (78.2, "DINO", "README.md", 51, "<td>78.2%</td>"),
    # the DINO paper's video segmentation table (Table 5), not in its README
    "DINO ViT-S/16, DAVIS-2017 J&F (reference)": (61.8, "DINO", None, None, None),
    "DINO ViT-B/16, DAVIS-2017 J&F (reference)": (62.3, "DINO", None, None, None),
}
REPOS = {"DanielShalam/BAM": "BAM_OFFICIAL_REPO", "DINO": "DINO_OFFICIAL_REPO"}


def test_the_paper_table_cites_only_published_numbers_from_their_sources():
    rows = load_suite("paper")["table"]
    published = {r["label"]: r for r in rows if "published" in r}
    assert set(published) == set(PUBLISHED)  # no number without a transcribed source
    for label, (value, source, *_) in PUBLISHED.items():
        assert published[label]["published"] == value and source in published[label]["source"], label
    # the ViT-B/16 number is the official probe's best validation epoch: the row reads that metric, from the preset
    vitb = published["BAM ViT-B/16, linear top-1 (best validation epoch, as the official probe)"]
    assert vitb["metric"] == "top1_best_epoch_on_val"
    assert load_suite("paper")["steps"][vitb["step"]]["args"]["preset"] == "bam_vitb"


@pytest.mark.parametrize("source", sorted(REPOS))
def test_the_transcribed_published_numbers_match_their_files(source):
    import os
    from pathlib import Path

    if not os.environ.get(REPOS[source]):
        pytest.skip(f"set {REPOS[source]} to a checkout of {source} to check the transcription against its files")
    root = Path(os.environ[REPOS[source]])
    for label, (_, src, path, line, text) in PUBLISHED.items():
        if src == source and path:
            assert text in " ".join((root / path).read_text().splitlines()[line - 1].split()), label


def small_suite(tmp_path, tiny_folder, fail_pretrain=False):
    """pretrain (seconds) -> k-NN on its checkpoint, and a table with one measured row and one reference row."""
    flags = tiny_args(tiny_folder, "unused", epochs=2)
    pre = {k[2:]: v for k, v in zip(flags[::2], flags[1::2]) if k != "--output-dir"}
    if fail_pretrain:
        pre["data"] = str(tmp_path / "no-images-here")
    digits = make_digit_folders(tmp_path / "digits")
    spec = {"datasets": {"digits": str(digits)},
            "steps": {"pre": {"entry": "pretrain", "args": pre},
                      "knn": {"task": "knn", "checkpoint": "pre",
                              "args": {"data": "{digits}", "image_size": 32, "k": "5,20", "num_workers": 0}}},
            "table": [{"label": "tiny k-NN (k=5)", "step": "knn", "metric": "top1_k5"},
                      {"label": "a reference row", "published": 74.5, "source": "a test fixture"}]}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_small_suites_dry_run_has_its_dependencies_and_resources(tmp_path, tiny_folder, capsys):
    suite, out = small_suite(tmp_path, tiny_folder), tmp_path / "out"
    assert main(["--suite", str(suite), "--output-dir", str(out), "--dry-run", "--launcher", "slurm",
                 "--partition", "short", "--time-min", "15", "--sbatch", "comment=bam"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("suite small") and "2 steps, launcher slurm" in lines[0]
    assert lines[1].startswith("  pre  [local: partition=short nodes=1 tasks/node=1 gpus/node=0 cpus/task=1")
    assert "time=15min --comment=bam]  after: -" in lines[1] and lines[2].strip().startswith("python pretrain/main.py")
    assert lines[3].startswith("  knn  [local: partition=short") and lines[3].endswith("after: afterok:pre")
    assert lines[4].strip() == (f"python eval/run.py --task knn --data {tmp_path / 'digits'} --image-size 32 --k 5,20 "
                                f"--num-workers 0 --checkpoint {out / 'pre' / 'checkpoint.pth'} "
                                f"--output-dir {out / 'knn'}")
    assert "then: paper_table.md/.csv" in lines[5] and not out.exists()


def test_a_small_suite_runs_in_order_and_renders_the_table(tmp_path, tiny_folder):
    suite, out = small_suite(tmp_path, tiny_folder), tmp_path / "out"
    assert main(["--suite", str(suite), "--output-dir", str(out)]) == 0
    knn = json.loads((out / "knn" / "results.json").read_text())
    assert knn["checkpoint"] == str(out / "pre" / "checkpoint.pth")
    with (out / "paper_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["experiment"] == "tiny k-NN (k=5)" and float(rows[0]["measured"]) == knn["metrics"]["top1_k5"]
    assert rows[0]["published"] == "" and rows[1]["measured"] == "" and rows[1]["published"] == "74.5"
    md = (out / "paper_table.md").read_text()
    assert f"| tiny k-NN (k=5) | {knn['metrics']['top1_k5']:.1f} |  | " in md and "| a reference row |  | 74.5 |" in md


def test_a_failed_step_skips_the_steps_that_read_its_checkpoint(tmp_path, tiny_folder, caplog):
    suite, out = small_suite(tmp_path, tiny_folder, fail_pretrain=True), tmp_path / "out"
    assert main(["--suite", str(suite), "--output-dir", str(out)]) == 1
    assert "skipping knn: step pre did not complete" in caplog.text and not (out / "knn").exists()
    assert "no knn/results.json yet" in (out / "paper_table.md").read_text()


def test_suite_bad_input_is_one_line(tmp_path, tiny_folder, caplog):
    suite = small_suite(tmp_path, tiny_folder)
    assert_one_line_error(main, ["--suite", str(suite), "--only", "knn", "--output-dir", str(tmp_path / "o")],
                          caplog, "evaluates " + str(tmp_path / "o" / "pre" / "checkpoint.pth") +
                          " (written by step pre), which does not exist")
    assert_one_line_error(main, ["--suite", "paper", "--output-dir", str(tmp_path / "p")], caplog,
                          "suite paper needs --dataset ade20k=DIR")
    assert_one_line_error(main, ["--suite", "paper", "--dry-run", "--dataset", "imagenet1k=/x"], caplog,
                          "--dataset imagenet1k: suite paper reads ade20k, coco, davis, imagenet")
    assert_one_line_error(main, ["--suite", "papers"], caplog, "--suite papers: no such suite; known: all, paper")
    assert_one_line_error(main, ["--suite", "all", "--checkpoint", str(tmp_path / "none.pth"), "--dry-run"], caplog,
                          "none.pth does not exist; check --checkpoint")
    with pytest.raises(SystemExit):
        main(["--suite", "paper", "--task", "knn"])


def test_the_report_card_has_every_tasks_metrics_and_its_plots(tmp_path, tiny_folder, davis_root):
    pre = tmp_path / "pre"
    from pretrain.main import main as pretrain_main
    assert pretrain_main(tiny_args(tiny_folder, pre, epochs=2)) == 0  # a checkpoint whose folder has log.jsonl
    digits = make_digit_folders(tmp_path / "digits")
    spec = {"datasets": {"digits": str(digits), "davis": str(davis_root)},
            "steps": {"knn": {"task": "knn", "checkpoint": "{checkpoint}",
                              "args": {"data": "{digits}", "image_size": 32, "k": "5,20", "num_workers": 0}},
                      "davis": {"task": "davis", "checkpoint": "{checkpoint}",
                                "args": {"data": "{davis}", "short_side": 64, "long_multiple": 32}}},
            "report": True}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    ckpt = pre / "checkpoint.pth"
    assert main(["--suite", str(tmp_path / "card.yaml"), "--checkpoint", str(ckpt), "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    knn = json.loads((out / "knn" / "results.json").read_text())
    davis = json.loads((out / "davis" / "results.json").read_text())
    assert f"| knn | knn | top1_k20 | {knn['metrics']['top1_k20']:.2f} |" in report
    assert f"| davis | davis | J&F-Mean | {davis['metrics']['J&F-Mean']:.2f} |" in report
    assert str(ckpt) in report and knn["per_class_top1"].keys() == {"0", "1", "2"}
    for png in ("metrics.png", "curves.png", "davis_overlays.png", "per_class.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in report, png


def test_table_rows_scale_davis_fractions_to_percent(tmp_path):
    (tmp_path / "davis_s").mkdir()
    (tmp_path / "davis_s" / "results.json").write_text(json.dumps({"metrics": {"J&F-Mean": 0.617}}))
    spec = {"name": "t", "table": [{"label": "J&F", "step": "davis_s", "metric": "J&F-Mean", "scale": 100,
                                    "published": 61.8, "source": "s"},
                                   {"label": "missing", "step": "knn_s", "metric": "top1_k20"}]}
    rows = table_rows(spec, tmp_path)
    assert rows[0]["measured"] == pytest.approx(61.7) and rows[0]["results"] == "davis_s/results.json"
    assert rows[1]["measured"] is None and rows[1]["results"] == "no knn_s/results.json yet (see --status)"
    assert all(r.get("scale") == 100 for r in load_suite("paper")["table"] if r.get("metric") == "J&F-Mean")
