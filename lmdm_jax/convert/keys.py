"""The one key report every converter raises: nothing is skipped silently."""
from __future__ import annotations


def check_keys(what: str, bad_shape, missing, unexpected, allow_missing: bool,
               allow_unexpected: bool, bad_label: str = "wrongly shaped keys") -> None:
  """Raise a ValueError listing wrongly shaped keys, and missing / unexpected keys unless allowed."""
  problems = []
  if bad_shape:
    problems.append(f"{bad_label}: {bad_shape}")
  if missing and not allow_missing:
    problems.append(f"missing keys: {missing}")
  if unexpected and not allow_unexpected:
    problems.append(f"unexpected keys: {sorted(unexpected)}")
  if problems:
    raise ValueError(f"cannot load the {what}: " + "; ".join(problems) +
                     " (pass allow_missing / allow_unexpected to accept missing or unknown keys)")
