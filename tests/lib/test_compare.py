import pytest

from tlflow.tasks.lib.assess import compare
from tlflow.tasks.lib.core.handoff.train import CompareRow
from tlflow.tasks.lib.core.params import Extract


def _result(name: str, val: float, n_val: int = 100, gflops: float | None = 1.0,
            parameters: int | None = 1000) -> CompareRow:
    return CompareRow(backbone=name, extractor_id=f"id-{name}", input_size=224, code_dim=1280,
                      layer="pooled", C=1.0, val_accuracy=val, n_val=n_val, test_accuracy=0.9,
                      images_per_s=50.0, gflops=gflops, parameters=parameters, store_mb=3.0)


def test_the_best_on_val_wins_beyond_one_standard_error():
    # se of 0.95 on 100 images is 0.0218: 0.90 is beyond it
    results = [_result("a", 0.90, gflops=0.4), _result("b", 0.95, gflops=2.0)]
    assert compare.pick(results) == 1


def test_a_tie_within_one_standard_error_goes_to_the_cheaper():
    results = [_result("big", 0.95, gflops=2.0), _result("small", 0.94, gflops=0.4)]
    assert results[0].val_se == pytest.approx((0.95 * 0.05 / 100) ** 0.5)
    assert compare.pick(results) == 1
    # equal GFLOPs: fewer parameters; all equal: the order of params.yaml
    same = [_result("x", 0.95, parameters=9), _result("y", 0.95, parameters=5)]
    assert compare.pick(same) == 1
    assert compare.pick([_result("x", 0.95), _result("y", 0.95)]) == 0


def test_without_val_images_only_the_best_wins():
    """cv (no val split): no standard error, so no tie unless equal."""
    results = [_result("a", 0.95, n_val=0, gflops=2.0), _result("b", 0.94, n_val=0)]
    assert compare.pick(results) == 0


def test_candidates_take_packaged_weights_where_tlflow_has_them():
    cfg = Extract(weights="packaged", compare=("timm/tf_efficientnet_lite0",
                                               "timm/tf_efficientnet_lite2", "timm/resnet50",
                                               "torchvision/resnet18"))
    assert compare.candidate_specs(cfg) == [
        ("timm/tf_efficientnet_lite0", "packaged"), ("timm/tf_efficientnet_lite2", "packaged"),
        ("timm/resnet50", "imagenet"), ("torchvision/resnet18", "imagenet")]


@pytest.mark.parametrize(("value", "needle"), [
    (["lite1"], "'lite1' is not <source>/<model>"),
    (["timm/a", "timm/a"], "backbones must be unique"),
])
def test_bad_compare_lists(value, needle):
    with pytest.raises(ValueError, match=needle):
        Extract(compare=tuple(value))


def test_the_table_marks_the_winner_and_states_the_rule():
    results = [_result("timm/tf_efficientnet_lite0", 0.95, gflops=0.8),
               _result("timm/tf_efficientnet_lite2", 0.96, gflops=1.8)]
    rep = compare.report(results, compare.pick(results))
    assert rep.winner == "timm/tf_efficientnet_lite0"  # within one se, cheaper
    text = compare.format_table(rep)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["backbone", "px", "dim"]
    assert lines[1].startswith("*tf_efficientnet_lite0") and lines[2].startswith(" tf_eff")
    assert "0.9500" in lines[1] and "0.80" in lines[1]
    assert lines[-1] == f"* serves: timm/tf_efficientnet_lite0 (rule: {compare.RULE})"


def test_cost_counts_flops_and_parameters():
    from tlflow.tasks.lib.features.backbones import create_backbone

    b = create_backbone("timm/tf_efficientnet_lite0", "none", image_size=224)
    gflops, params = compare.cost(b)
    assert params == 4_652_008  # timm's tf_efficientnet_lite0, ImageNet classifier included
    assert 0.7 < gflops < 0.9  # 0.4 GMACs at 224 px (EfficientNet-Lite0's published 407M MACs)


def test_the_prefect_table_artifact_rows(tmp_path):
    from tests.conftest import make_params
    from tlflow.flows.artifacts import compare_rows
    from tlflow.tasks.lib.core.handoff.train import CompareReport

    paths = make_params(tmp_path).base.paths
    assert compare_rows(paths) == []  # no report yet
    CompareReport(compared=False).write(paths.compare_report)
    assert compare_rows(paths) == []
    results = [_result("timm/a", 0.95), _result("timm/b", 0.90)]
    compare.report(results, 0).write(paths.compare_report)
    rows = compare_rows(paths)
    assert [r["backbone"] for r in rows] == ["*a", " b"]
    assert rows[1]["val acc"] == "0.9000" and rows[1]["GFLOPs"] == "1.00"


def test_short_names_for_the_metrics():
    lite = [f"timm/tf_efficientnet_lite{n}" for n in (0, 1, 2)]
    assert compare.short_names(lite) == ["lite0", "lite1", "lite2"]
    assert compare.short_names(["timm/resnet50", lite[0]]) == ["resnet50",
                                                                "tf_efficientnet_lite0"]
    assert compare.short_names(["timm/resnet18", "torchvision/resnet18"]) == [
        "timm_resnet18", "torchvision_resnet18"]
    assert compare.short_names([lite[0]]) == ["tf_efficientnet_lite0"]
