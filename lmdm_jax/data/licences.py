"""Debian copyright files read per file, and licence names in SPDX style with a freedom check.

``copyright_for(text, path)``: the licence and copyright line that a package's
``/usr/share/doc/<pkg>/copyright`` gives one installed file: for the machine-readable format
(https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/), the last ``Files`` stanza
whose pattern matches the file (patterns name upstream paths; any suffix of the installed path may
match); for older free-text files, the GPL version in the text and the "Upstream Author" or
copyright-sign line. ``spdx_name`` maps Debian short names (``GPL-2+``, ``CC-BY-SA-3.0``,
``GPL-2+ or CC-BY-SA``) to SPDX style; ``is_free`` says whether such an expression is a free
(DFSG) licence. Text only: nothing in a copyright file is executed.
"""
from __future__ import annotations

import fnmatch
import re

def parse_paragraphs(text: str) -> list:
  """deb822 paragraphs -> [{field (lower case): value}]; continuation lines are joined with
  newlines (a lone ``.`` is an empty line)."""
  paras, cur, key = [], {}, None
  for line in text.splitlines():
    if not line.strip():
      if cur:
        paras.append(cur)
      cur, key = {}, None
      continue
    if line[:1] in (" ", "\t"):
      if key is not None:
        s = line.strip()
        cur[key] += "\n" + ("" if s == "." else s)
      continue
    m = re.match(r"([A-Za-z][A-Za-z0-9-]*):(.*)$", line)
    if m:
      key = m.group(1).lower()
      cur[key] = m.group(2).strip()
    else:
      key = None
  if cur:
    paras.append(cur)
  return paras


def is_machine_readable(text: str) -> bool:
  paras = parse_paragraphs(text)
  fmt = paras[0].get("format", "").lower() if paras else ""
  return "copyright-format" in fmt or "dep5" in fmt


def _path_matches(pattern: str, path: str) -> bool:
  """A DEP-5 ``Files`` pattern against an installed path: the pattern names upstream paths
  (``data/music/x.ogg``), the package installs them under a prefix, so any path suffix that
  starts at a ``/`` may match. ``*`` matches across ``/`` as the format says."""
  parts = path.split("/")
  return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def _holder_line(copyright_field: str) -> str:
  lines = [re.sub(r"\s*<[^<>@\s]+@[^<>\s]+>", "", s).strip() for s in copyright_field.splitlines()]
  return "; ".join(s for s in lines if s)


def copyright_for(text: str, path: str) -> dict:
  """The licence of one installed file from its package's copyright file.

  Returns ``{"licence_debian": short name as written, "copyright": holder line (emails
  removed), "stanza": the matching Files patterns or "free text"}``; the licence is "" when the
  file names none.
  """
  if is_machine_readable(text):
    best = None
    for p in parse_paragraphs(text):
      if "files" in p and any(_path_matches(pat, path) for pat in p["files"].split()):
        best = p  # the last matching stanza wins
    if best is None:
      return dict(licence_debian="", copyright="", stanza="")
    return dict(licence_debian=best.get("license", "").split("\n")[0].strip(),
                copyright=_holder_line(best.get("copyright", "")),
                stanza=" ".join(best["files"].split()))
  flat = " ".join(text.split())
  lic = ""
  m = re.search(r"(Lesser )?General Public License.{0,80}?version (\d(?:\.\d)?)(.{0,60})", flat)
  if m:
    later = re.search(r"any later version|or later", m.group(3)) is not None
    lic = f"{'L' if m.group(1) else ''}GPL-{m.group(2)}{'+' if later else ''}"
  holder = ""
  for line in text.splitlines():
    m = re.match(r"\s*Upstream Authors?:\s*(.+)$", line)
    if m:
      holder = m.group(1)
      break
    m = re.search(r"(?:©|Copyright \(C\))\s*(.+)$", line, re.I)
    if m:
      holder = m.group(1)
      break
  return dict(licence_debian=lic, copyright=_holder_line(holder), stanza="free text")


_SPDX = {"gpl": "GPL-1.0-or-later", "lgpl": "LGPL-2.0-or-later", "expat": "MIT", "mit": "MIT",
         "cc0": "CC0-1.0", "public-domain": "LicenseRef-public-domain",
         "drascula-license": "LicenseRef-Drascula"}


def spdx_name(name: str) -> str:
  """A Debian short licence name (``GPL-2+``, ``CC-BY-SA-3.0``, ``GPL-2+ or CC-BY-SA``) in SPDX
  style (``GPL-2.0-or-later``, ...). Unknown names become ``LicenseRef-<name>``."""
  parts = re.split(r"\s+(or|and)\s+", name.strip(), flags=re.I)
  out = []
  for i, p in enumerate(parts):
    if i % 2:
      out.append(p.upper())
      continue
    p = p.strip().strip(",")
    low = p.lower()
    m = re.fullmatch(r"(l?gpl)-(\d)(?:\.(\d))?(\+)?", low)
    if m:
      ver = f"{m.group(2)}.{m.group(3) or '0'}"
      out.append(f"{m.group(1).upper()}-{ver}-{'or-later' if m.group(4) else 'only'}")
    elif (m := re.fullmatch(r"cc-(by(?:-sa|-nc|-nd|-nc-sa|-nc-nd)?)(?:-(\d\.\d))?(\+)?", low)):
      base = f"CC-{m.group(1).upper()}" + (f"-{m.group(2)}" if m.group(2) else "")
      out.append(base + ("-or-later" if m.group(3) else ""))
    elif low in _SPDX:
      out.append(_SPDX[low])
    elif re.fullmatch(r"cc0-1\.0", low):
      out.append("CC0-1.0")
    elif re.fullmatch(r"bsd-\d-clause", low):
      out.append(low.upper().replace("CLAUSE", "Clause"))
    else:
      out.append("LicenseRef-" + re.sub(r"[^A-Za-z0-9.+-]+", "-", p) if p else "")
  return " ".join(out)


# DFSG-free licences (SPDX ids or prefixes). LicenseRef-Drascula: Alcachofa Soft's licence for
# the freeware Drascula, accepted into Debian main like Beneath a Steel Sky (free use, copying,
# modification and distribution; attribution and keeping its notices are required; no selling of
# the game itself as a product).
FREE_LICENCES = ("GPL-", "LGPL-", "AGPL-", "CC0-", "CC-BY-SA", "MIT", "BSD-", "ISC", "Zlib",
                 "Apache-", "Artistic-2.0", "OFL-", "LicenseRef-public-domain",
                 "LicenseRef-Drascula")
NON_FREE_MARKS = ("-NC", "-ND", "non-free", "Proprietary")


def _one_free(lic: str) -> bool:
  if not lic or any(mark.lower() in lic.lower() for mark in NON_FREE_MARKS):
    return False
  if re.fullmatch(r"CC-BY(-\d\.\d)?(-or-later)?", lic):
    return True
  return lic.startswith(FREE_LICENCES)


def is_free(spdx: str) -> bool:
  """True when an SPDX-style expression (with OR / AND, no parentheses) is a free licence: one
  free alternative of an OR, every term of an AND."""
  if not spdx.strip():
    return False
  return any(all(_one_free(t.strip()) for t in alt.split(" AND "))
             for alt in spdx.split(" OR "))


def person_name(s: str) -> str:
  """A holder line as a name: years, URLs, emails and 'Copyright' wording removed."""
  s = re.sub(r"\(?https?://\S+\)?", "", s)
  s = re.sub(r"<[^>]*>", "", s)
  s = re.sub(r"(?i)\bcopyright\b|\(c\)|©", "", s)
  s = re.sub(r"^[\s,;]*(\d{4}(\s*[-,]\s*\d{2,4})*[\s,]*)+", "", s.strip())
  return " ".join(s.split()).strip(" ,;")
