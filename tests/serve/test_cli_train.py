"""`sae-serve train` hands its arguments to `python -m trainer` (serve/ never imports trainer/)."""

from __future__ import annotations

from serve.launch.cli import main


def test_train_passes_config_to_the_trainer(tmp_path, capfd):
    missing = tmp_path / "no-such-config.yaml"
    assert main(["train", "--config", str(missing), "--set", "optim.steps=1"]) != 0
    assert str(missing) in capfd.readouterr().err
