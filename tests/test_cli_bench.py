from glm47.checkpoint.writer import init_checkpoint
from glm47.cli.main import main
from glm47.config import preset


def test_bench_reports_every_measurement(tmp_path, capsys):
    init_checkpoint(preset("tiny-glm47"), tmp_path, seed=0)
    rc = main(["bench", "--model", str(tmp_path), "--dtype", "float32", "--decode-tokens", "4", "--concurrent", "3",
               "--prefill", "40", "--history", "64", "--kv-cache-tokens", "1024"])
    out = capsys.readouterr().out
    assert rc == 0
    for words in ("batch-1 decode", "roofline", "3 concurrent", "prefill    40", "with prefix caching"):
        assert words in out, out


def test_bench_rejects_a_nonsense_size(capsys):
    assert main(["bench", "--model", "x", "--prefill", "0"]) == 2
    assert "--prefill must be at least 2" in capsys.readouterr().err
