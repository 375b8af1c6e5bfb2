"""The command line of train.py and arc.py: absl flags for what is not the model's recipe (work
directory, data, base run) and an ``ml_collections.config_flags`` config for everything that is:

  python3 train.py --config demo --config.train.batch_size=4 --config.train.stage1.lr=1e-4 ...
  python3 train.py --config configs/demo.py --workdir runs/x     # the same file, by its path
  python3 arc.py --config path/to/my_arc.py:arg --config.arc.lr_g=2e-5 ...

``--config`` takes a registered name (``tiny``, ``saos:enc_dec``) or the user's own config file
(``path/to/file.py[:arg]``), loaded by ``lmdm_jax.config.load_cli_config``; ``--config.a.b=v``
sets a field, typed as the config's (config_flags); the command's defaults for the fields it reads
(``train.*``, ``arc.*``, ...) are filled in first, so each of them can be set even when the config
file does not list it. The fields set on the command line come back as ``overrides``
({"train.batch_size": 4}), which the run records as data in its work directory. Flags may be
spelled with dashes (``--no-progress``) or underscores (``--no_progress``). Every problem (an
unknown flag or field, a value of the wrong type, a bad config) is a ``UsageError``: one line.
"""
from __future__ import annotations

import dataclasses
import re
import sys

from absl import flags
from ml_collections import config_flags

from lmdm_jax.apps.common import UsageError
from lmdm_jax.config import fill_defaults, flat_fields, load_cli_config, one_line


@dataclasses.dataclass
class Parsed:
  flags: flags.FlagValues  # the command's own flags: .workdir, .data, ...
  conf: object  # the ConfigDict, overrides applied (locked: no new fields)
  config: str  # the --config value as given (registered name or path[:arg])
  overrides: dict  # {"train.batch_size": 4}: the fields set on the command line


class _ConfigParser(flags.ArgumentParser):
  """``--config``'s value -> the config (registered name or path), the command's defaults filled
  in, locked. Replaces config_flags' file loader, which takes paths only."""

  def __init__(self, defaults: dict):
    self.defaults = defaults

  def parse(self, value):
    conf = fill_defaults(load_cli_config(value), self.defaults)
    conf.lock()
    return conf

  def flag_type(self):
    return "config"


_HELP = ("-h", "--help", "-help", "--helpfull")


def _joined_config(argv) -> list[str]:
  """``--config NAME`` -> ``--config=NAME`` (one spelling to look for)."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] in ("--config", "-config") and i + 1 < len(argv):
      out.append("--config=" + argv[i + 1])
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


def _underscored(argv, names) -> list[str]:
  """``--no-progress`` -> ``--no_progress`` for the command's own flags (absl spells them with
  underscores); config fields and values are left as they are."""
  out = []
  for a in argv:
    m = re.match(r"^(--?)([A-Za-z][A-Za-z0-9-]*)(=.*)?$", a)
    if m and "-" in m.group(2) and m.group(2).replace("-", "_") in names:
      a = m.group(1) + m.group(2).replace("-", "_") + (m.group(3) or "")
    out.append(a)
  return out


def _hint(fv, name: str) -> str:
  """For an unknown flag that is a config field's name (the flags before config_flags):
  ``; set config fields with --config.train.steps=VALUE``."""
  try:
    conf = fv["config"].value
  except Exception:  # noqa: BLE001 - no config parsed
    conf = None
  name = name.replace("-", "_")
  fields = [p for p, _ in flat_fields(conf)] if conf is not None else []
  hits = [f"--config.{p}" for p in fields if p == name or p.endswith("." + name)]
  if hits:
    return f"; config fields are set as --config.FIELD=VALUE: {' or '.join(hits[:3])}"
  return "; see --help"


def _unknown_field(argv, defaults) -> str | None:
  """The first ``--config.a.b`` of ``argv`` that the config lacks, as a one-line message."""
  value = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  conf = _ConfigParser(defaults).parse(value[-1]) if value else None
  for a in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
    if conf is None or not m:
      continue
    node, seen = conf, []
    for name in m.group(1).split("."):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if name not in fields:
        where = ".".join(seen) or "the config"
        return (f"--config.{m.group(1)}: {where} has no field {name!r}; its fields: "
                f"{', '.join(fields) or '(none: not a section)'}")
      node, seen = node[name], seen + [name]
  return None


def _help(prog: str, doc: str, fv, conf, config: str) -> str:
  lines = [doc.strip(), "", "flags:", fv.get_help(include_special_flags=False).strip()]
  if conf is not None:
    lines += ["", f"config fields of --config {config} (set any with --config.FIELD=VALUE, typed "
              "as shown; the value is its default):"]
    lines += [f"  --config.{p}={v!r}" for p, v in flat_fields(conf)]
  return "\n".join(lines)


def parse(argv, *, prog: str, doc: str, define, default_config: str, defaults: dict):
  """``argv`` (without the program name) -> ``Parsed``; None when help was asked for (printed).

  ``define(fv)`` defines the command's own flags on ``fv`` (their help states the defaults);
  ``defaults``: the fields the command reads, filled into the config where it lacks them."""
  argv = list(sys.argv[1:] if argv is None else argv)
  want_help = any(a in _HELP for a in argv)
  argv = [a for a in argv if a not in _HELP]
  fv = flags.FlagValues()
  define(fv)
  argv = _joined_config(_underscored(argv, set(fv)))
  if not any(a.startswith("--config=") for a in argv):
    argv = [f"--config={default_config}"] + argv
  full = [prog] + argv
  config_flags.DEFINE_config_file(
      "config", default_config, flag_values=fv, sys_argv=full,
      help_string="the config: a registered name (tiny, demo, live, saos[:enc_dec], arc_tiny, "
                  "arc_demo, arc_live, ...) or your own path/to/config.py[:arg]; set any of "
                  "its fields with --config.FIELD=VALUE, e.g. --config.train.batch_size=4 "
                  "(--help with a --config lists its fields)")
  fv["config"].parser = _ConfigParser(defaults)
  try:
    rest = fv(full)
  except flags.UnrecognizedFlagError as e:
    raise UsageError(f"unknown flag --{e.flagname}{_hint(fv, e.flagname)}") from None
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  except (AttributeError, KeyError) as e:  # config_flags: a field the config does not have
    raise UsageError(_unknown_field(argv, defaults) or f"unknown config field {one_line(e)}") \
        from None
  if len(rest) > 1:
    raise UsageError(f"unexpected argument {rest[1]!r} (flags are --name=value)")
  flag = fv["config"]
  if want_help:
    print(_help(prog, doc, fv, flag.value, flag.config_filename))
    return None
  overrides = {k: _plain(v) for k, v in flag.override_values.items()}
  return Parsed(flags=fv, conf=flag.value, config=flag.config_filename, overrides=overrides)


def _plain(v):
  """An override's value as JSON data (tuples -> lists)."""
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def required(fv, name: str) -> str:
  value = fv[name].value
  if not value:
    raise UsageError(f"--{name} is required (see --help)")
  return value


def define_process_flags(fv: flags.FlagValues) -> None:
  """train.py's and arc.py's flags for a run of several processes (docs/TRAINING.md)."""
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordinator, the same for "
                      "every process (default: $JAX_COORDINATOR_ADDRESS; none: one process)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes of the run (default: "
                       "$JAX_NUM_PROCESSES, 1; also --num-processes)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1 (default: "
                       "$JAX_PROCESS_ID; also --process-id)", flag_values=fv)


def init_processes(fv) -> bool:
  """Starts the distributed runtime from ``define_process_flags``' flags, before anything uses
  a device; ValueError names a bad value."""
  from lmdm_jax.training import distributed
  return distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
