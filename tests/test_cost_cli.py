"""The cost model through tvmc: energy budgets, --target-pim-psq-cost, the report's cost section, host MACs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from psq_tvm.cli import main  # noqa: E402
from psq_tvm.core.cost import COST_PRESETS  # noqa: E402

from test_onnx_models import small_cnn  # noqa: E402

SMALL = ["--target-pim-psq-rows", "32", "--target-pim-psq-cols", "32", "-q"]


def run(capsys, *args):
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    onnx.save(small_cnn(), d / "m.onnx")
    (d / "cost.json").write_text(json.dumps({"adc_pj": {"9": 3.0}, "dac_pj": 0.5}))
    return d


@pytest.fixture(scope="module")
def energy_pkg(model):
    out = model / "e.tar"
    rc = main(["compile", str(model / "m.onnx"), "-o", str(out), "--psq-budget", "energy-reduction=2.5",
               "--target-pim-psq-cost", str(model / "cost.json")] + SMALL)
    assert rc == 0
    return out


def test_energy_budget_is_met_and_reported(energy_pkg, capsys):
    rc, out, _ = run(capsys, "report", energy_pkg, "--json")
    assert rc == 0
    cost = json.loads(out)["cost"]
    for v in ("psq", "uniform16", "uniform8"):
        assert {"energy_uj", "latency_us", "area_mm2", "chips", "layers", "pipeline"} <= set(cost[v])
        assert len(cost[v]["layers"]) == 2
        # per-layer energies plus the host part make the total
        assert sum(l["energy_uj"] for l in cost[v]["layers"]) + cost[v]["energy_parts_uj"]["host"] == \
            pytest.approx(cost[v]["energy_uj"])
    assert cost["psq"]["energy_uj"] <= cost["uniform16"]["energy_uj"] / 2.5 * (1 + 1e-9)
    # the file's numbers were used and stored
    assert cost["params_values"]["adc_pj"]["9"] == 3.0 and cost["params_values"]["dac_pj"] == 0.5
    assert cost["params_values"]["read_ns"] == COST_PRESETS["isaac"].read_ns
    # the depthwise conv stays on the host: [1,16,6,6] outputs x 1*3*3 weights each = 5184 MACs
    assert cost["psq"]["energy_parts_uj"]["host"] == pytest.approx(5184 * COST_PRESETS["isaac"].host_mac_pj * 1e-6)
    rc, out, _ = run(capsys, "report", energy_pkg)
    assert "hardware cost" in out and "energy:" in out


def test_report_recomputes_from_the_package_alone(energy_pkg, model, capsys):
    rc, out, _ = run(capsys, "report", energy_pkg, "--json")
    stored = json.loads(out)["cost"]
    (model / "same.json").write_text("{}")
    rc, out, _ = run(capsys, "report", energy_pkg, "--json", "--cost", model / "same.json")
    again = json.loads(out)["cost"]
    for v in ("psq", "uniform16", "uniform8"):
        assert again[v] == stored[v]
    # doubling the ADC energy adds exactly the ADC part again
    (model / "adc2.json").write_text(json.dumps({"adc_pj": {"9": 6.0}}))
    rc, out, _ = run(capsys, "report", energy_pkg, "--json", "--cost", model / "adc2.json")
    assert rc == 0
    dbl = json.loads(out)["cost"]["psq"]
    assert dbl["energy_uj"] == pytest.approx(stored["psq"]["energy_uj"] + stored["psq"]["energy_parts_uj"]["adc"])


def test_unreachable_energy_budget_says_the_minimum(model, capsys):
    rc, _, err = run(capsys, "compile", model / "m.onnx", "-o", model / "x.tar", "--psq-budget", "energy=1e-9", *SMALL)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "cannot be met" in err and "uJ" in err
    assert not (model / "x.tar").exists()


def test_bad_cost_file_is_one_line(model, capsys):
    (model / "bad.json").write_text(json.dumps({"adc_energy": 1}))
    rc, _, err = run(capsys, "compile", model / "m.onnx", "-o", model / "y.tar", "--target-pim-psq-cost",
                     model / "bad.json", *SMALL)
    assert rc == 1 and "unknown cost parameter" in err and len(err.strip().splitlines()) == 1


def test_model_over_one_chip_warns(model, capsys):
    (model / "tiny.json").write_text(json.dumps({"crossbars_per_unit": 1, "adcs_per_unit": 1, "units_per_tile": 1,
                                                 "tiles_per_chip": 2}))
    out = model / "c.tar"
    rc, _, err = run(capsys, "compile", model / "m.onnx", "-o", out, "--psq-budget", "reduction=2",
                     "--target-pim-psq-cost", model / "tiny.json", *SMALL)
    assert rc == 0
    rc, js, _ = run(capsys, "report", out, "--json")
    cost = json.loads(js)["cost"]["psq"]
    assert cost["chips"] == -(-cost["crossbars"] // 2) > 1
    assert "chips" in err and not cost["fits_one_chip"]
    assert np.isfinite(cost["energy_uj"])
