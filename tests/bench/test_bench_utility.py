"""The utility benchmark's plumbing, without a training run: its sites, its summary, table and figure."""

import math

import numpy as np
import pytest

from bench.bench_utility import Setting, make_sites, plot, report_lines, summary
from bench.report import write_block
from common.site import load_site


def site_figures(tstr, trtr, lesion):
    score = lambda ba: {"balanced_accuracy": ba, "auc": ba}  # noqa: E731
    fid = {"frechet_distance": 3.0, "precision": 0.6, "recall": 0.5, "coverage": 0.55}
    return {
        "fidelity": {"overall": fid, "per_class": {}},
        "radiomics": {"train_synthetic_test_real": score(0.6), "train_real_test_real": score(0.7)},
        "cnn": {
            "train_synthetic_test_real": score(tstr),
            "train_real_test_real": score(trtr),
            "recognised": {"healthy": 0.9, "lesion": lesion},
            "recognised_holdout": {"healthy": 0.9, "lesion": 0.8},
        },
    }


def result():
    rows = []
    for eps, tstr in ((1.0, 0.5), (math.inf, 0.72)):
        rows.append(
            {
                "epsilon": eps,
                "recipe": {"batch_size": 187, "steps": 40, "noise_multiplier": 3.2},
                "sites": {f"site-{i}": site_figures(tstr, 0.8, tstr - 0.1) for i in range(3)},
                "seconds": {"train": 10.0, "synthesize": 5.0, "score": 3.0},
            }
        )
    return {
        "setting": {**Setting().__dict__, "patients": 1000, "epsilons": (1.0, math.inf)},
        "prevalence": (0.25, 0.1, 0.15),
        "seconds": {"sites": 1.0, "pretrain": 2.0, "trtr": 3.0},
        "rows": rows,
    }


def test_summary_table_and_figure(tmp_path):
    r = result()
    m = summary(r["rows"][1])
    assert m["cnn_ratio"] == pytest.approx(0.9) and m["lesion_detectable"] == pytest.approx(0.62)
    assert m["min_coverage"] == 0.55
    lines = report_lines(r, "python -m bench.bench_utility", "utility_vs_epsilon.png")
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 3 and table[2].startswith("| no DP | 0.72 / 0.80 (0.90; **0.73**)")
    assert table[1].startswith("| 1 | 0.50 / 0.80 (0.62; **0.00**)")
    # classifiers that cannot tell the classes on real data either: a ratio near 1 says nothing, the gain n/a
    near_chance = {**r["rows"][0], "sites": {"a": site_figures(0.5, 0.53, 0.4)}}
    assert summary(near_chance)["cnn_ratio"] == pytest.approx(0.943, abs=1e-3)
    assert "0.50 / 0.53 (0.94; **n/a**)" in "\n".join(
        report_lines({**r, "rows": [near_chance]}, "cmd", "fig.png")
    )
    assert "3 phantom sites x 1000 patients" in "\n".join(lines) and "partial" not in "\n".join(
        lines
    )
    assert "Scored again" not in "\n".join(lines)
    rescored = "\n".join(report_lines({**r, "rescored": "yes"}, "cmd", "fig.png"))
    assert "Scored again with the classifiers of a later checkout" in rescored  # --rescore says so
    # rows of runs whose sites released their noise levels carry the cohort scored with them; others say "-"
    assert table[1].split(" | ")[9] == "-"
    noisy = {
        **r["rows"][1],
        "sites": {
            f"site-{i}": {
                **site_figures(0.72, 0.8, 0.6),
                "with_noise_level": {
                    "sigma": 0.02,
                    "fidelity": {
                        "frechet_distance": 1.0,
                        "precision": 0.5 + i / 10,
                        "coverage": 0.3,
                    },
                    "radiomics": {"train_synthetic_test_real": {"balanced_accuracy": 0.7}},
                },
            }
            for i in range(3)
        },
    }
    assert summary(noisy)["noise_precision"] == pytest.approx(0.6)
    [row] = [x for x in report_lines({**r, "rows": [noisy]}, "c", "f") if x.startswith("| no DP")]
    assert row.split(" | ")[9] == "1.0 / 0.60 (0.50) / 0.30 (0.30); 0.70"
    # with a CNN trained on the noisy cohort (session 18 on): its TSTR and the gain it keeps of the real CNN's
    for i, site in enumerate(noisy["sites"].values()):
        site["with_noise_level"]["cnn"] = {
            "train_synthetic_test_real": {"balanced_accuracy": 0.55 + 0.05 * i}
        }
    m = summary(noisy)
    assert m["noise_cnn_tstr"] == pytest.approx(0.6) and m["noise_cnn_gain"] == pytest.approx(1 / 3)
    [row] = [x for x in report_lines({**r, "rows": [noisy]}, "c", "f") if x.startswith("| no DP")]
    assert row.split(" | ")[9] == "1.0 / 0.60 (0.50) / 0.30 (0.30); 0.70; 0.60 (**0.33**)"
    r["setting"]["epsilons"] = (1.0, 4.0, 10.0, math.inf)  # a run cut short says so
    assert "2 of 4 epsilons measured" in "\n".join(report_lines(r, "cmd", "fig.png"))
    out = tmp_path / "PERFORMANCE.md"
    out.write_text("# Performance\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    write_block(out, "bench_utility", lines)
    write_block(out, "bench_utility", lines)  # a rerun replaces its block
    text = out.read_text()
    assert text.count("Privacy-utility curve") == 1 and "kept" in text
    png = plot(r, tmp_path / "fig.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sites_are_non_iid_and_all_carry_lesions(tmp_path):
    sites = make_sites(tmp_path, Setting(preset="tiny", patients=12))
    data = [
        load_site(s, class_names=("healthy", "lesion"), spatial_dims=2, image_size=32)
        for s in sites
    ]
    assert len(data) == 3 and all(d.labels.sum() >= 1 for d in data)
    assert len({float(np.mean(d.images)) for d in data}) == 3  # three protocols
