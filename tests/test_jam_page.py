"""The jam page as a musician uses it, in headless Chromium driven over the DevTools protocol.

The jam server of tests/test_jam_server.py (tiny model, random weights) and Chromium with a fake
microphone playing a WAV of decaying notes. The test presses the page's buttons and reads what it
shows: the caption-style default prompt and its examples, the set-up progress stages, both level
meters' dBFS readouts (finite and moving), a switch of the input device mid-jam, and one recorded
take downloaded (Browser.setDownloadBehavior) as three WAV files (your part, the model's part,
the mix) that are valid, aligned and hold the audio. A screenshot of the page is saved under the
test's temporary directory (its path is printed; LMDM_JAM_SCREENSHOTS=DIR copies the screenshots
there).
"""
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a server process and (page) headless Chromium
import soundfile as sf

websockets = pytest.importorskip("websockets", reason="the jam server needs the `websockets` "
                                 "package (requirements.txt)")
from websockets.asyncio.client import connect  # noqa: E402

from tests.test_jam_server import find_chromium, server  # noqa: E402,F401 (the server fixture)

pytestmark = pytest.mark.slow

SR = 22050


class DevTools:
  """A minimal Chrome DevTools protocol client: call(method, session=None, **params)."""

  def __init__(self, ws):
    self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []
    self.task = asyncio.create_task(self._read())

  async def _read(self):
    try:
      async for raw in self.ws:
        msg = json.loads(raw)
        fut = self.pending.pop(msg.get("id"), None)
        if fut is not None:
          fut.set_result(msg)
        else:
          self.events.append(msg)
    except websockets.ConnectionClosed:
      pass  # Browser.close, or Chromium went away (the calls waiting time out)

  async def call(self, method, session=None, timeout=30.0, **params):
    self.next_id += 1
    fut = asyncio.get_running_loop().create_future()
    self.pending[self.next_id] = fut
    msg = {"id": self.next_id, "method": method, "params": params}
    if session:
      msg["sessionId"] = session
    await self.ws.send(json.dumps(msg))
    reply = await asyncio.wait_for(fut, timeout)
    assert "error" not in reply, f"{method}: {reply['error']}"
    return reply["result"]


class Page:
  def __init__(self, dt, session):
    self.dt, self.session = dt, session

  async def js(self, expr):
    r = await self.dt.call("Runtime.evaluate", self.session, expression=expr, returnByValue=True,
                           awaitPromise=True, userGesture=True)
    assert "exceptionDetails" not in r, f"{expr}: {r['exceptionDetails']}"
    return r["result"].get("value")

  async def screenshot(self, path):
    png = await self.dt.call("Page.captureScreenshot", self.session, format="png",
                             captureBeyondViewport=True)
    path.write_bytes(base64.b64decode(png["data"]))

  async def wait(self, expr, timeout, what):
    """Poll ``expr`` until it is truthy (an exception counts as not yet: the page may still
    be loading)."""
    end = time.time() + timeout
    while True:
      v = await self.js(f"(() => {{ try {{ return {expr}; }} catch (e) {{ return false; }} }})()")
      if v:
        return v
      if time.time() > end:
        state = await self.js("JSON.stringify({status: $('status').textContent, "
                              "log: $('log').textContent, setup: $('stages').textContent})")
        raise AssertionError(f"timed out ({timeout} s) waiting for {what}; page: {state}")
      await asyncio.sleep(0.1)


def partner_wav(path, sr=48000, seconds=6.0):
  """Notes of a quarter second, each decaying: the input level keeps moving."""
  t = np.arange(int(seconds * sr)) / sr
  notes = np.array([262.0, 330.0, 392.0, 523.0])[(t * 4).astype(int) % 4]
  env = np.exp(-6 * (t % 0.25))
  sf.write(str(path), 0.4 * env * np.sin(2 * np.pi * np.cumsum(notes) / sr), sr, subtype="PCM_16")


def test_jam_page_meters_setup_device_and_recording(server, tmp_path, capsys):  # noqa: F811
  browser = find_chromium()
  if browser is None:
    pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome)")
  wav = tmp_path / "partner.wav"
  partner_wav(wav)
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  profile = tmp_path / "profile"
  cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1100,1500",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
         "about:blank"]
  log_path = tmp_path / "chromium.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    found = asyncio.run(asyncio.wait_for(
        drive(server, profile, downloads, tmp_path / "jam_page.png"), 150))
  finally:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
      proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  shot = tmp_path / "jam_page.png"
  if os.environ.get("LMDM_JAM_SCREENSHOTS"):
    for f in tmp_path.glob("jam_page*.png"):
      shutil.copy(f, os.environ["LMDM_JAM_SCREENSHOTS"])
  with capsys.disabled():
    print(f"\njam page: {json.dumps(found)}; screenshot {shot}")

  # the take: three WAVs (RIFF/WAVE, 16-bit mono at the server's rate), the same length
  files = sorted(downloads.glob("*.wav"))
  assert [f.name.rsplit("-", 1)[1] for f in files] == ["input.wav", "mix.wav", "model.wav"], files
  parts = {}
  for f in files:
    part = f.name.rsplit("-", 1)[1][:-4]
    head = f.read_bytes()[:44]
    assert head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt " and head[36:40] == b"data", head
    info = sf.info(str(f))
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16"), info
    assert f.stat().st_size == found["bytes"][part], (f, found["bytes"])
    parts[part] = sf.read(str(f), dtype="float32")[0]
  n = {k: v.size for k, v in parts.items()}
  assert len(set(n.values())) == 1 and n["input"] >= 1.5 * SR, n
  x, y, mix = parts["input"], parts["model"], parts["mix"]
  assert np.sqrt(np.mean(x ** 2)) > 0.02, "your part holds the microphone's notes"
  assert np.abs(y).max() > 1e-3, "the model's part holds generated audio"
  # the mix is 0.5 (you + model), sample for sample (16-bit rounding of three files)
  assert np.abs(mix - np.clip(0.5 * (x + y), -1, 1)).max() < 3 / 32767


async def drive(server, profile, downloads, shot):  # noqa: F811
  port_file = profile / "DevToolsActivePort"
  end = time.time() + 30
  while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
    assert time.time() < end, "Chromium did not open its DevTools port"
    await asyncio.sleep(0.1)
  port, path = port_file.read_text().split()[:2]
  found = {}
  async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
    dt = DevTools(ws)
    await dt.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads),
                  eventsEnabled=True)
    target = (await dt.call("Target.createTarget", url=server.http + "/"))["targetId"]
    session = (await dt.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
    page = Page(dt, session)
    await page.wait("document.readyState === 'complete' && !$('start').disabled", 30,
                    "the server's hello")

    # a caption-style default prompt, and examples that fill the prompt box
    prompt = await page.js("$('prompt').value")
    assert prompt.endswith("BPM.") and len(prompt) > 40, prompt
    examples = await page.js("[...document.querySelectorAll('#examples button')]"
                             ".map((b) => b.dataset.prompt)")
    assert len(examples) >= 3 and all(e.endswith(".") for e in examples), examples
    await page.js("document.querySelectorAll('#examples button')[2].click()")
    assert await page.js("$('prompt').value") == examples[2]
    assert await page.js("$('db_in').dataset.db + $('db_out').dataset.db") == ""

    # start: the set-up progress names the server's stages
    await page.js("$('steps').value = 2; $('delay').value = 2; $('cfg').value = 1; "
                  "$('start').click()")
    await page.wait("$('stages').children.length >= 2 || S.sessionStarted", 20,
                    "the set-up panel's first server stage")
    if not await page.js("S.sessionStarted"):  # a look at the set-up progress
      await page.screenshot(shot.with_name("jam_page_setup.png"))
    await page.wait("S.sessionStarted", 90, "the session to start")
    setup = await page.wait("$('r_setup').textContent.includes(' s: ') && "
                            "$('r_setup').textContent", 2, "the set-up summary")
    # the block step: compiled for this session's pool, or already compiled (a slot is taken)
    for stage in ("encoding the prompt", "compiling the decoder"):
      assert stage in setup, setup
    assert "compiling the block step" in setup or "taking a session slot" in setup, setup
    found["setup"] = setup

    # the meters: dBFS readouts become finite for both parts, and move
    finite = "(k) => Number.isFinite(parseFloat($('db_' + k).dataset.db))"
    await page.wait(f"({finite})('in') && ({finite})('out')", 40,
                    "finite dBFS readouts for the input and the model")
    seen = set()
    for _ in range(12):
      seen.add(await page.js("$('db_in').dataset.db"))
      await asyncio.sleep(0.26)
    assert len(seen) >= 3, f"the input meter does not move: {seen}"
    levels = await page.js("[$('db_in').dataset.db, $('db_out').dataset.db, $('db_in').textContent]")
    assert -40 < float(levels[0]) < 0 and -100 < float(levels[1]) <= 0, levels
    assert levels[2].endswith("dBFS"), levels
    found["db"] = levels[:2]

    # switch the input device mid-jam: the input restarts on it, the session goes on
    devices = await page.js("[...$('device').options].map((o) => o.value)")
    if len(devices) > 1:
      sent = await page.js("S.sent")
      await page.js(f"$('device').value = {json.dumps(devices[-1])}; "
                    "$('device').dispatchEvent(new Event('change'))")
      await page.wait("$('log').textContent.includes('input switched to')", 10, "the new input")
      await page.wait(f"S.sent > {sent} + 22050 && S.media && "
                      f"S.media.getAudioTracks()[0].getSettings().deviceId === "
                      f"{json.dumps(devices[-1])}", 10, "audio from the new device")
      await page.wait(f"({finite})('in')", 5, "the input meter after the switch")
      found["devices"] = len(devices)

    # record a take of about 2 s, download its three files
    await page.js("$('record').click()")
    start = await page.js("S.sent")
    await page.wait(f"S.sent >= {start} + 2 * S.sr", 20, "2 s of recording")
    await page.js("$('record').click()")
    await page.wait("document.querySelectorAll('#takes a.download').length === 3", 10,
                    "the take's download links")
    found["bytes"] = await page.js(
        "Object.fromEntries([...document.querySelectorAll('#takes a.download')]"
        ".map((a) => [a.dataset.part, Number(a.dataset.bytes)]))")
    for i in range(3):
      await page.js(f"document.querySelectorAll('#takes a.download')[{i}].click()")
      await asyncio.sleep(0.3)
    end = time.time() + 20
    while len([e for e in dt.events if e.get("method") == "Browser.downloadProgress"
               and e["params"]["state"] == "completed"]) < 3:
      assert time.time() < end, f"downloads: {os.listdir(downloads)}"
      await asyncio.sleep(0.1)

    await page.js("$('numbers').open = true")
    await asyncio.sleep(0.6)  # a few meter frames with the numbers shown
    await page.screenshot(shot)
    await page.js("$('stop').click()")
    errors = await page.js("S.errors")
    assert not errors, errors
    assert "page error" not in await page.js("$('log').textContent")
    found["log"] = await page.js("[...$('log').children].map((d) => d.textContent)")
    await dt.call("Browser.close")
  assert all(b > 44 for b in found["bytes"].values()), found["bytes"]
  return found
