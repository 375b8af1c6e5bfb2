"""train.py / arc.py command lines (issue 14 item 6): ``--config`` takes a registered name or a path,
``--config.a.b=v`` sets a typed field (ml_collections config_flags), a bad flag or field is one
stderr line and exit 2 before anything is built, and the fields set are recorded as data in the
work directory, so a resumed run and sampling from it use the same config."""
import json
import os

import pytest

from lmdm_jax.apps import arc_cli, run_flags, train_cli
from lmdm_jax.config import CONFIG_DIR, apply_overrides, config_named_by_file, load_config
from tests.test_cli_inputs import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(argv):
  return run_flags.parse(argv, prog="train.py", doc=train_cli.__doc__,
                         define=train_cli.define_flags, default_config="tiny",
                         defaults=train_cli.config_defaults())


def _arc(argv):
  from lmdm_jax.training.arc_run import config_defaults
  return run_flags.parse(argv, prog="arc.py", doc=arc_cli.__doc__, define=arc_cli.define_flags,
                         default_config="arc_tiny", defaults=config_defaults())


def test_registered_name_and_path_name_the_same_config(tmp_path):
  by_name = _train(["--config", "demo", "--workdir", "w"])
  by_path = _train([f"--config={os.path.join(CONFIG_DIR, 'demo.py')}", "--workdir", "w"])
  assert by_name.conf.to_dict() == by_path.conf.to_dict()
  assert by_name.config == "demo" and by_path.config.endswith("demo.py")
  assert by_name.conf.to_dict() != _train(["--workdir", "w"]).conf.to_dict()  # default: tiny
  # the :arg of a registered name and of a path reaches get_config
  assert _train(["--config", "saos:enc_dec"]).conf.sampler.regime == "enc_dec"
  assert _train(["--config", "configs/tiny.py:enc_dec"]).conf.sampler.regime == "enc_dec"
  own = tmp_path / "mine.py"  # the user's own file
  own.write_text("from lmdm_jax.config import load_config\n"
                 "def get_config():\n  c = load_config('tiny')\n  c.name = 'mine'\n  return c\n")
  p = _train(["--config", str(own), "--config.train.steps=7"])
  assert (p.conf.name, p.conf.train.steps, p.config) == ("mine", 7, str(own))


def test_overrides_set_typed_fields_and_are_reported():
  p = _train(["--config", "demo", "--config.train.batch_size=4", "--config.train.stage1.lr", "1",
              "--config.sampler.steps=3", "--config.seed=5", "--workdir=w", "--data", "d"])
  c = p.conf
  assert (c.train.batch_size, c.sampler.steps, c.seed) == (4, 3, 5)
  assert c.train.stage1.lr == 1.0 and isinstance(c.train.stage1.lr, float)
  assert p.overrides == {"train.batch_size": 4, "train.stage1.lr": 1.0, "sampler.steps": 3,
                         "seed": 5}
  assert (p.flags.workdir, p.flags.data) == ("w", "d")
  untouched = load_config("demo")
  assert c.train.stage1.b2 == untouched.train.stage1.b2 and c.model.depth == untouched.model.depth
  assert _train(["--config", "demo"]).overrides == {}


def test_every_field_a_command_reads_can_be_set():
  """Fields the config file does not list (tiny has no train.sample_every nor stage1.ema_decay;
  arc configs leave disc_backbone and adapter.layers None) take the command's default and can be
  set, typed."""
  p = _train(["--config", "tiny"])
  assert p.conf.train.sample_every == 0 and p.conf.train.stage1.ema_decay == 0.0
  p = _train(["--config", "tiny", "--config.train.sample_every=2",
              "--config.train.stage1.ema_decay=0.99"])
  assert (p.conf.train.sample_every, p.conf.train.stage1.ema_decay) == (2, 0.99)
  p = _arc(["--config", "arc_demo", "--config.arc.lr_g=2e-5", "--config.disc_backbone=saos:base",
            "--config.adapter.layers=(0, 2)", "--config.arc_train.fsdp=2", "--base-step", "3",
            "--disc-ckpt=x"])
  c = p.conf
  assert (c.arc.lr_g, c.arc.lr_d) == (2e-5, load_config("arc_demo").arc["lr_d"])
  assert (c.disc_backbone, tuple(c.adapter.layers), c.arc_train.fsdp) == ("saos:base", (0, 2), 2)
  assert (p.flags.base_step, p.flags.disc_ckpt) == (3, "x")  # dashed spellings of the flags
  assert p.overrides["adapter.layers"] == [0, 2]  # recorded as JSON data
  assert _arc(["--config", "arc_demo"]).conf.disc_backbone is None


@pytest.mark.parametrize("cli,argv,needles", [
    (train_cli, ["--config.train.nope=3"], ["--config.train.nope", "no field 'nope'",
                                            "batch_size"]),
    (train_cli, ["--config.nosec.x=1"], ["--config.nosec.x", "no field 'nosec'"]),
    (train_cli, ["--config.train.batch_size=x"], ["--config.train.batch_size=x", "int"]),
    (train_cli, ["--config.model.depth=2.5"], ["--config.model.depth=2.5"]),
    (train_cli, ["--steps", "3"], ["unknown flag --steps", "--config.train.steps"]),
    (train_cli, ["--config", "nosuchconfig"], ["nosuchconfig", "not a registered config"]),
    (train_cli, ["--config", "configs/nothere.py"], ["no file configs/nothere.py"]),
    (train_cli, ["--config", "arc_demo:lr_g=1e-4"], ["arc_demo"]),  # no override specs any more
    (train_cli, ["--config.model.num_heads=3"], ["num_heads"]),  # 128 % 3: DiTConfig's check
    (train_cli, ["--config.train.fsdp=3"], ["fsdp=3"]),
    (train_cli, ["--data", "/no/such/folder"], ["--data", "not a latent dataset folder"]),
    (train_cli, ["extra"], ["unexpected argument 'extra'"]),
    (arc_cli, ["--config.arc.lr_gg=1e-5"], ["--config.arc.lr_gg", "lr_g"]),
    (arc_cli, ["--config.arc.max_k=9"], ["max_k"]),  # ARCConfig's check
    (arc_cli, ["--lr-g=1"], ["unknown flag --lr-g", "--config.arc.lr_g"]),
    (arc_cli, ["--base_step=x"], ["--base_step"]),
])
def test_bad_command_lines_exit_2_with_one_line(capsys, tmp_path, cli, argv, needles):
  wd = tmp_path / "run"
  rc = cli.main(["--workdir", str(wd)] + argv)
  prog = "train.py" if cli is train_cli else "arc.py"
  line = one_error_line(capsys, rc, f"{prog}: error:", *needles)
  assert not wd.exists(), line  # nothing was started


def test_workdir_is_required(capsys):
  one_error_line(capsys, train_cli.main(["--config", "tiny"]), "--workdir is required")
  one_error_line(capsys, arc_cli.main([]), "--workdir is required")


def test_help_describes_every_flag_and_config_field_with_its_default(capsys):
  assert train_cli.main(["--config", "demo", "--help"]) == 0
  out = capsys.readouterr().out
  for needle in ("--data:", "(default: 'synthetic')", "--workdir:", "--[no]no_progress:",
                 "--config:", "(default: 'tiny')", "--config.train.batch_size=8",
                 "--config.train.stage1.lr=0.0004", "--config.model.depth=6", "--config.seed=0"):
    assert needle in out, (needle, out)
  assert arc_cli.main(["-h"]) == 0
  out = capsys.readouterr().out
  for needle in ("--base:", "--base_step:", "--disc_ckpt:", "(default: 'arc_tiny')",
                 "--config.arc.lr_g=", "--config.arc_train.steps=20", "--config.disc_backbone=None"):
    assert needle in out, (needle, out)


def test_recorded_overrides_are_applied_as_data(tmp_path):
  where = "run/config.json overrides"
  c = apply_overrides(load_config("tiny"), {"sampler.steps": 3, "train.stage1.ema_decay": 0.5,
                                            "adapter.layers": [0, 1]}, where)
  assert c.sampler.steps == 3 and c.train.stage1.ema_decay == 0.5  # added: training's default
  assert tuple(c.adapter.layers) == (0, 1)
  for bad, needle in [({"sampler.steps": "x"}, "sampler.steps"), ({"a..b": 1}, "field path"),
                      ({"_x": 1}, "field path"), ({"seed": {"a": 1}}, "not a number"),
                      ({"model.depth.x": 1}, "not a section"), ([1], "mapping")]:
    with pytest.raises(ValueError) as e:
      apply_overrides(load_config("tiny"), bad, where)
    assert where in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
  # with the recorded name a registered config only: a path in the record is never run
  marker = tmp_path / "ran"
  evil = tmp_path / "evil.py"
  evil.write_text(f"open({str(marker)!r}, 'w')\ndef get_config():\n  return None\n")
  with pytest.raises(ValueError, match="not a registered config"):
    config_named_by_file(str(evil), "config", "run/config.json", {"seed": 1})
  assert not marker.exists()
  assert config_named_by_file("configs/tiny.py", "config", "f", {"seed": 4}).seed == 4


@pytest.mark.slow
def test_train_records_overrides_resumes_and_samples_with_them(tmp_path, capsys):
  """A run with --config.* fields records them in config.json; the same command resumes; a
  command with another model is refused in one line; sampling from the work directory uses the
  recorded sampler field."""
  from lmdm_jax.system import load_system
  wd = str(tmp_path / "run")
  cmd = ["--config", "tiny", "--workdir", wd, "--no-progress", "--config.train.batch_size=2",
         "--config.train.eval_every=0", "--config.train.stage1.lr=3e-4",
         "--config.sampler.steps=3"]
  assert train_cli.main(cmd + ["--config.train.steps=2"]) in (0, None)
  with open(os.path.join(wd, "config.json")) as f:
    rec = json.load(f)
  assert rec["config"] == "tiny"
  assert rec["overrides"] == {"train.batch_size": 2, "train.eval_every": 0,
                              "train.stage1.lr": 3e-4, "sampler.steps": 3, "train.steps": 2}
  assert (rec["train"]["batch_size"], rec["train"]["stage1"]["lr"]) == (2, 3e-4)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert [json.loads(ln)["step"] for ln in f] == [2]  # log_every 10: the last step
  capsys.readouterr()
  assert train_cli.main(cmd + ["--config.train.steps=3"]) in (0, None)  # longer: resumes
  assert "resumed from step 2" in capsys.readouterr().out
  rc = train_cli.main(cmd + ["--config.train.steps=4", "--config.model.depth=1"])
  one_error_line(capsys, rc, "another model", "model.depth 2 there, 1 here")
  system = load_system(wd, log=lambda *_: None)
  assert system.defaults.steps == 3 and load_config("tiny").sampler.steps == 8
