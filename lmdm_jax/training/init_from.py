"""Fine-tuning: start a train.py run from a pretrained model (``train.init_from``) and freeze
parameters by name (``train.freeze``).

Sources are read by the same checked loaders as sampling (``lmdm_jax.sources.load_dit``, passed
in as ``load``; their files are untrusted data and nothing in them is run): a converted
stable-audio-tools / LMDM checkpoint directory (``lmdm convert``, e.g. Stable Audio Open Small), a
bundle ``.npz``, a train.py work directory (its EMA weights when it has them, as arc.py's
``--base``) or an arc.py run (base + adapter, merged).

Parameters are matched by path (``layers/0/self_attn/to_qkv/kernel``, see ``param_name``) and
shape; buffers (rotary ``inv_freq``, LayerNorm zero biases) load the same way. What the target
config adds starts so that the model computes what the source computed while the new inputs are
absent (zeros):
- ``widened``: ``to_input_add_embed/kernel`` with more input rows (a wider ``input_add_dim``:
  extra channel groups after [mask | context]): the source rows load, the new rows are zero;
- ``new``: a parameter the source lacks. Output projections of new branches start at zero
  (``to_input_add_embed``, ``to_global_embed_2``, a block's ``self_attn/to_out``,
  ``cross_attn/to_out``, ``ff_out``); the rest of a new branch keeps its fresh init, which is
  allowed only when every projection it reaches the output through is new (so zero). So input_add
  (from a base model), global conditioning, cross-attention and whole blocks can be added; e.g. a
  qk-norm inside a loaded attention cannot, and is an ``InitError`` naming it;
- ``dropped``: source parameters the target lacks.
Any other shape difference is an ``InitError`` naming the parameter. ``init_model`` returns the
report (``InitReport``; train.py prints it and writes ``<workdir>/init_report.json``). The init
applies at step 0 only: a resumed run restores its checkpoint.

Freezing: ``train.freeze`` is a regular expression; parameters whose ``param_name`` it matches in
full get no updates (``optax.multi_transform`` with ``set_to_zero``: no optimizer state, no weight
decay), so they stay bit-identical to their init.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class InitError(ValueError):
  """An init source or freeze pattern that cannot be used; one line naming the problem."""


# New parameters that start at zero: the output projections of branches the source lacks.
ZERO_NEW = re.compile(r"to_input_add_embed/kernel|to_global_embed_2/kernel|"
                      r"layers/\d+/(self_attn|cross_attn)/to_out/kernel|"
                      r"layers/\d+/ff_out/(kernel|bias)")
# Other new parameters: (pattern, the zero-started projections they reach the output through;
# {n} is the pattern's layer). Such a parameter may be new only when all of those are new too.
BEHIND = (
    (r"to_input_add_embed/bias", ("to_input_add_embed/kernel",)),
    (r"to_global_embed_0/.*|to_global_embed_2/bias", ("to_global_embed_2/kernel",)),
    (r"to_cond_embed_[02]/.*", ("layers/*/cross_attn/to_out/kernel",)),
    (r"layers/(?P<n>\d+)/(cross_attend_norm|cross_attn)/.*",
     ("layers/{n}/cross_attn/to_out/kernel",)),
    (r"layers/(?P<n>\d+)/(pre_norm|self_attn)/.*", ("layers/{n}/self_attn/to_out/kernel",)),
    (r"layers/(?P<n>\d+)/(ff_norm|ff_in)/.*", ("layers/{n}/ff_out/kernel",)),
)
WIDENABLE = ("to_input_add_embed/kernel",)  # input rows [mask | context | extra groups ...]


def param_name(path) -> str:
  """A flat-state path (``('layers', 0, 'ff_in', 'kernel')``) or a pytree key path of an
  ``nnx.State`` -> ``'layers/0/ff_in/kernel'``."""
  parts = []
  for k in path:
    k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(k))
  if parts and parts[-1] == "value":  # the Variable's own attribute in a pytree key path
    parts.pop()
  return "/".join(parts)


def _flat(state) -> dict:
  return {param_name(p): v[...] for p, v in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------ freezing


def freeze_pattern(pattern: str):
  """The compiled ``train.freeze`` regex, or None for ""; InitError for an invalid one."""
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise InitError(f"train.freeze {pattern!r} is not a regular expression ({e})") from None


def freeze_labels(params, pattern: str):
  """The params pytree with "frozen" / "train" leaves (full matches of ``pattern``)."""
  rx = freeze_pattern(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if rx is not None and rx.fullmatch(param_name(p)) else "train", params)


def frozen_names(params, pattern: str) -> list[str]:
  """Names of the parameters ``pattern`` freezes; InitError when it freezes none (a typo)."""
  rx = freeze_pattern(pattern)
  if rx is None:
    return []
  names = [n for n in _flat(params) if rx.fullmatch(n)]
  if not names:
    raise InitError(f"train.freeze {pattern!r} matches no parameter (names look like "
                    "'layers/0/self_attn/to_qkv/kernel'; the pattern must match a whole name)")
  return names


def with_freeze(tx: optax.GradientTransformation, pattern: str) -> optax.GradientTransformation:
  """``tx`` for the parameters ``pattern`` does not match; zero updates for the rest."""
  if not pattern:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: freeze_labels(params, pattern))


# ----------------------------------------------------------------------------------- sources


@dataclasses.dataclass
class InitReport:
  source: str
  kind: str  # bundle | workdir | arc | converted
  weights: str  # which weights of the source (e.g. "ema", "params", "merged adapter")
  loaded: list  # names (parameters and buffers) copied as they are
  widened: list  # {"name", "source_shape", "shape"}: source rows + zero rows
  new: list  # {"name", "shape", "init": "zeros" | "fresh"}
  dropped: list  # {"name", "shape"}: in the source, not in the model
  frozen: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f"init from {self.source} ({self.kind}, {self.weights}): {len(self.loaded)} loaded, "
            f"{len(self.widened)} widened, {len(self.new)} new, {len(self.dropped)} dropped, "
            f"{len(self.frozen)} frozen")

  def lines(self) -> list[str]:
    out = [self.summary()]
    out += [f"  widened {w['name']} {tuple(w['source_shape'])} -> {tuple(w['shape'])} (new rows "
            "zero)" for w in self.widened]
    out += [f"  new {n['name']} {tuple(n['shape'])} ({n['init']})" for n in self.new]
    out += [f"  dropped {d['name']} {tuple(d['shape'])}" for d in self.dropped]
    out += [f"  note: {n}" for n in self.notes]
    return out

  def write(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)
    os.replace(tmp, path)


def _new_init(name: str, names, new: set, where: str) -> str:
  """'zeros' or 'fresh' for a variable of the model (``names``: all of them) that the source
  lacks (``new``); InitError when it cannot be added without changing the source's output."""
  if ZERO_NEW.fullmatch(name):
    return "zeros"
  for pat, gates in BEHIND:
    m = re.fullmatch(pat, name)
    if m is None:
      continue
    n = m.groupdict().get("n")
    rxs = [re.compile(re.escape(g.format(n=n)).replace(r"\*", r"\d+")) for g in gates]
    gated = [[x for x in names if rx.fullmatch(x)] for rx in rxs]
    if all(g and all(x in new for x in g) for g in gated):
      return "fresh"
    break
  raise InitError(f"{where}: parameter {name} is not in the source and would change the source "
                  "model's output (only input_add, conditioning branches and whole blocks can be "
                  "added); make the config match the source there")


def init_model(model, source: str, load) -> InitReport:
  """Load ``source`` into ``model`` (a DiT, updated in place) as the module docstring says.
  ``load(source)`` -> (source DiT, kind, which weights): the checked loaders of every model
  source (``lmdm_jax.sources.load_dit``; this layer does not import them); its ValueError or
  OSError becomes a one-line InitError."""
  where = f"train.init_from {source!r}"
  try:
    src, kind, weights = load(source)
  except (ValueError, OSError, KeyError) as e:
    raise InitError(f"{where}: {' '.join(str(e).split())}") from None
  src_cfg = src.cfg
  have = _flat(nnx.state(src))
  del src
  state = nnx.state(model)
  flat = dict(nnx.to_flat_state(state))
  names = {param_name(p): p for p in flat}
  new_names = {n for n in names if n not in have}
  loaded, widened, new, notes = [], [], [], []
  for n, p in names.items():
    var = flat[p]
    want = var.get_value()  # an array, or a ShapeDtypeStruct in an abstract model
    if n not in have:
      init = _new_init(n, names, new_names, where)
      if init == "zeros":
        flat[p] = var.replace(jnp.zeros_like(want))
      new.append({"name": n, "shape": list(want.shape), "init": init})
      continue
    got = np.asarray(have[n])
    if got.shape == want.shape:
      if (n == "inv_freq" and isinstance(want, jax.Array)
          and not np.allclose(got, np.asarray(want), rtol=1e-5)):
        notes.append(f"the rotary frequencies (inv_freq) are the source's, not those of this "
                     f"config's rope_base {model.cfg.rope_base:g}")
      flat[p] = var.replace(jnp.asarray(got, want.dtype))
      loaded.append(n)
    elif (n in WIDENABLE and got.ndim == want.ndim == 2 and got.shape[1] == want.shape[1]
          and got.shape[0] < want.shape[0]):
      rows = jnp.zeros_like(want).at[:got.shape[0]].set(jnp.asarray(got, want.dtype))
      flat[p] = var.replace(rows)
      widened.append({"name": n, "source_shape": list(got.shape), "shape": list(want.shape)})
    else:
      raise InitError(f"{where}: parameter {n} has shape {tuple(got.shape)} in the source but "
                      f"{tuple(want.shape)} in the model (only extra input_add channels, a wider "
                      "input_add_dim, can differ)")
  dropped = [{"name": n, "shape": list(np.shape(v))} for n, v in have.items() if n not in names]
  nnx.update(model, nnx.from_flat_state(flat))
  if src_cfg.positions != model.cfg.positions:
    notes.append(f"the source streams in the {src_cfg.positions!r} rotary layout; this run "
                 f"trains in {model.cfg.positions!r}")
  return InitReport(source=source, kind=kind, weights=weights, loaded=loaded, widened=widened,
                    new=new, dropped=dropped, notes=notes)


def start(model, tr: dict, workdir: str, resuming: bool, load, log=print) -> InitReport | None:
  """train.py's step-0 init: checks ``tr["freeze"]`` against the model (and, on resume, against
  the pattern the run recorded: its optimizer state depends on it); without a checkpoint to
  resume and with ``tr["init_from"]``, loads it into ``model`` and writes the report to
  ``<workdir>/init_report.json``. ``load``: as ``init_model``'s. Returns the report (None
  when nothing was loaded)."""
  freeze = tr.get("freeze") or ""
  frozen = frozen_names(nnx.state(model, nnx.Param), freeze)
  if resuming:
    rec = os.path.join(workdir, "config.json")
    if os.path.isfile(rec):
      from lmdm_jax import file_checks as fc
      before = ((fc.read_json(rec, "work directory config").get("train") or {}).get("freeze")
                or "")
      if before != freeze:
        raise InitError(f"train.freeze {freeze!r} differs from the {before!r} this run was "
                        "started with (its optimizer state depends on it): keep it, or start a "
                        "new --workdir with --init " + workdir)
    if tr.get("init_from"):
      log(f"init_from {tr['init_from']} ignored: resuming from this run's checkpoint")
    return None
  if not tr.get("init_from"):
    return None
  report = init_model(model, tr["init_from"], load)
  report.frozen = frozen
  for line in report.lines():
    log(line)
  if jax.process_index() == 0:
    report.write(os.path.join(workdir, "init_report.json"))
  return report
