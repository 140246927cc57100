"""`glm47 plan` end to end: the JSON schema, the human table with its arithmetic, and exit codes."""

import json
import subprocess
import sys

import pytest

from glm47.cli.main import main
from glm47.config import preset

REQUIRED = {"total_params", "active_params", "weights_gb", "kv_cache_gb", "min_gpus", "max_context_at_min_gpus"}


def run_plan(capsys, *args):
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_fields_for_glm47_fp8_on_h200(capsys):
    code, out, err = run_plan(capsys, "--model", "glm-4.7", "--quant", "fp8", "--gpu", "h200", "--context", "200000",
                              "--batch", "1", "--json")
    assert code == 0 and err == ""
    d = json.loads(out)
    assert REQUIRED <= d.keys()
    assert d["total_params"] == 356_785_898_816 and d["active_params"] == 32_080_373_664
    assert d["min_gpus"] == 4 and d["max_context_at_min_gpus"] == 202_752 and d["next_gpus"] == 8
    assert d["kv_bytes_per_token"] == 93 * 2 * 8 * 128 and d["kv_dtype"] == "fp8"
    assert d["kv_cache_gb"] == pytest.approx(93 * 2 * 8 * 128 * 200_000 / 1e9)
    assert 358 < d["weights_gb"] < 360 and d["usable_gb_per_gpu"] == pytest.approx(141 * 0.8)
    assert [o["gpus"] for o in d["options"]] == [1, 2, 4, 8, 16, 32]
    assert [o["fits"] for o in d["options"]] == [False, False, True, True, True, True]


def test_human_table_shows_the_arithmetic(capsys):
    code, out, _ = run_plan(capsys, "--quant", "bf16", "--gpu", "h100", "--context", "200000")
    assert code == 0
    assert "380,928 B = 93 layers (92 + 1 MTP) x 2 (K, V) x 8 KV heads x 128 head_dim x 2 B (BF16)" in out
    assert "76.2 GB = 380,928 B x 200,000 tokens x 1 sequence" in out
    assert "713.6 GB = 355.11e9 linear x 2 B (BF16)" in out
    assert "H100 80 GB x 0.8 = 64.0 GB usable per GPU" in out
    assert "356.79e9 total = 352.80e9 main model + 3.99e9 MTP layer" in out
    assert "min GPUs     16 x H100" in out
    assert "(KV split 8 ways: heads replicated)" in out  # the 16-GPU row


def test_fp8_line_counts_scales_and_the_bf16_parts(capsys):
    _, out, _ = run_plan(capsys, "--gpu", "h100", "--context", "8192")
    assert "358.9 GB = 355.11e9 linear x 1 B (FP8) + 1.68e9 x 2 B (BF16" in out
    assert "0.48 GB FP8 scales" in out and "min GPUs     8 x H100" in out


def test_no_mtp_and_kv_dtype_and_mem_fraction_flags(capsys):
    _, out, _ = run_plan(capsys, "--gpu", "h200", "--context", "100000", "--no-mtp", "--kv-dtype", "bf16",
                         "--mem-fraction", "0.9", "--json")
    d = json.loads(out)
    assert d["mtp"] is False and d["mtp_params"] == 0 and d["kv_bytes_per_token"] == 92 * 2 * 8 * 128 * 2
    assert d["usable_gb_per_gpu"] == pytest.approx(141 * 0.9)


def test_context_max_means_the_models_window(capsys):
    _, out, _ = run_plan(capsys, "--model", "glm-4.5", "--gpu", "h200", "--context", "max", "--json")
    assert json.loads(out)["context"] == 131_072


def test_model_from_a_config_path(tmp_path, capsys):
    preset("glm-4.5-air").save(tmp_path)
    code, out, _ = run_plan(capsys, "--model", str(tmp_path), "--gpu", "h100", "--quant", "fp8", "--context", "32768",
                            "--json")
    d = json.loads(out)
    assert code == 0 and d["model"] == str(tmp_path) and d["min_gpus"] == 2  # 110 GB of FP8 weights


def test_does_not_fit_exits_1_and_says_so(capsys):
    code, out, _ = run_plan(capsys, "--quant", "bf16", "--gpu", "rtx4090", "--context", "200000")
    assert code == 1 and "does not fit: 32 x RTX4090" in out
    code, out, _ = run_plan(capsys, "--quant", "bf16", "--gpu", "rtx4090", "--context", "200000", "--json")
    d = json.loads(out)
    assert code == 1 and d["min_gpus"] is None and d["max_context_at_min_gpus"] is None and d["fits"] is False


@pytest.mark.parametrize("args, message", [
    (["--gpu", "tpu-v5"], "unknown GPU 'tpu-v5'"),
    (["--model", "glm-5"], "'glm-5' is neither a preset"),
    (["--context", "0"], "context must be a positive number of tokens"),
    (["--context", "-1"], "context must be a positive number of tokens"),
    (["--context", "lots"], "--context 'lots' is not a number of tokens"),
    (["--context", "300000"], "context 300,000 exceeds the model's maximum of 202,752"),
    (["--batch", "0"], "batch must be a positive number of sequences"),
    (["--mem-fraction", "0"], "mem_fraction must be in (0, 1]"),
])
def test_bad_input_exits_2_with_a_message(capsys, args, message):
    code, out, err = run_plan(capsys, "--context", "1000", *args)
    assert code == 2 and out == ""
    assert err.startswith("glm47 plan: error: ") and message in err


def test_a_bad_choice_is_rejected_by_argparse_with_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--context", "1000", "--quant", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_python_dash_m_exits_2_on_an_unknown_gpu():
    r = subprocess.run([sys.executable, "-m", "glm47", "plan", "--gpu", "h1000", "--context", "1000"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown GPU 'h1000'" in r.stderr and r.stdout == ""
