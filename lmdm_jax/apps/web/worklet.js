// AudioWorklet processors of the jam page (loaded with audioWorklet.addModule("worklet.js")).
//   jam-capture: the partner's audio (microphone or file) -> mono frames at the server's rate,
//                posted to the page, which sends them over the WebSocket.
//   jam-player:  the model's part from the page (server rate) -> a jitter buffer -> the speakers,
//                counting under-runs (the buffer ran dry while playing).
// `sampleRate` and `currentTime` are globals of the AudioWorkletGlobalScope.

// RBJ biquad low-pass (anti-aliasing before downsampling).
class LowPass {
  constructor(cutoff, rate) {
    const w = 2 * Math.PI * Math.min(cutoff / rate, 0.49);
    const q = Math.SQRT1_2;
    const alpha = Math.sin(w) / (2 * q);
    const cosw = Math.cos(w);
    const a0 = 1 + alpha;
    this.b0 = (1 - cosw) / 2 / a0;
    this.b1 = (1 - cosw) / a0;
    this.b2 = this.b0;
    this.a1 = (-2 * cosw) / a0;
    this.a2 = (1 - alpha) / a0;
    this.x1 = this.x2 = this.y1 = this.y2 = 0;
  }
  process(x) {
    const y = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) {
      const v = this.b0 * x[i] + this.b1 * this.x1 + this.b2 * this.x2 - this.a1 * this.y1 - this.a2 * this.y2;
      this.x2 = this.x1; this.x1 = x[i]; this.y2 = this.y1; this.y1 = v; y[i] = v;
    }
    return y;
  }
}

// Streaming linear-interpolation resampler (with a low-pass first when downsampling).
class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate;
    this.t = 0;      // position of the next output sample; 0 = the previous chunk's last input
    this.prev = 0;   // that last input sample
    this.lp = inRate > outRate * 1.01 ? new LowPass(0.45 * outRate, inRate) : null;
  }
  process(input) {
    const x = this.lp ? this.lp.process(input) : input;
    const n = x.length;
    if (n === 0) return new Float32Array(0);
    const out = new Float32Array(Math.ceil((n - this.t) / this.step) + 1);
    let k = 0, pos = this.t;
    while (pos < n) {
      const i = Math.floor(pos), f = pos - i;
      const a = i === 0 ? this.prev : x[i - 1];
      out[k++] = a + (x[i] - a) * f;
      pos += this.step;
    }
    this.t = pos - n;
    this.prev = x[n - 1];
    return out.subarray(0, k);
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.targetRate = o.targetRate || 22050;
    this.frameSamples = o.frameSamples || 1024;
    this.enabled = false;
    this.resampler = new Resampler(sampleRate, this.targetRate);
    this.frame = new Float32Array(this.frameSamples);
    this.fill = 0;
    this.port.onmessage = (e) => {
      if (e.data.type === "enable") { this.enabled = true; }
      if (e.data.type === "disable") { this.enabled = false; this.fill = 0; }
    };
  }
  process(inputs, outputs) {
    if (!this.enabled) return true;
    const chans = inputs[0] || [];
    const n = chans.length ? chans[0].length : 128;
    const mono = new Float32Array(n);  // silence while nothing is connected: the clock runs on
    for (const c of chans) for (let i = 0; i < n; i++) mono[i] += c[i] / chans.length;
    const y = this.resampler.process(mono);
    let off = 0;
    while (off < y.length) {
      const m = Math.min(y.length - off, this.frameSamples - this.fill);
      this.frame.set(y.subarray(off, off + m), this.fill);
      this.fill += m; off += m;
      if (this.fill === this.frameSamples) {
        const f = this.frame;
        this.port.postMessage({ type: "frame", data: f, time: currentTime }, [f.buffer]);
        this.frame = new Float32Array(this.frameSamples);
        this.fill = 0;
      }
    }
    return true;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.resampler = new Resampler(o.sourceRate || 22050, sampleRate);
    this.prebuffer = Math.round((o.prebufferSeconds || 0.1) * sampleRate);
    this.maxQueue = Math.round((o.maxQueueSeconds || 1.0) * sampleRate) + this.prebuffer;
    this.buf = new Float32Array(Math.max(this.maxQueue * 2, sampleRate * 4));
    this.head = 0;  // read index
    this.size = 0;  // queued samples
    this.playing = false;
    this.started = false;  // any audio yet (silence before it is not an under-run)
    this.underruns = 0;
    this.underrunSamples = 0;
    this.dropped = 0;
    this.played = 0;
    this.lastReport = 0;
    this.port.onmessage = (e) => {
      if (e.data.type === "audio") this.push(this.resampler.process(e.data.data));
      if (e.data.type === "reset") { this.size = 0; this.playing = false; this.started = false; }
    };
  }
  push(y) {
    const cap = this.buf.length;
    for (let i = 0; i < y.length; i++) {
      this.buf[(this.head + this.size) % cap] = y[i];
      if (this.size < cap) this.size++; else this.head = (this.head + 1) % cap;
    }
    this.started = true;
    if (this.size > this.maxQueue) {  // too far behind: drop the oldest, back to the prebuffer
      const drop = this.size - this.prebuffer;
      this.head = (this.head + drop) % cap; this.size -= drop; this.dropped += drop;
    }
  }
  process(inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    const cap = this.buf.length;
    if (!this.playing && this.size >= this.prebuffer && this.started) this.playing = true;
    if (this.playing) {
      const m = Math.min(n, this.size);
      for (let i = 0; i < m; i++) out[0][i] = this.buf[(this.head + i) % cap];
      this.head = (this.head + m) % cap; this.size -= m; this.played += m;
      if (m < n) {  // ran dry: silence, count it, and refill the prebuffer before going on
        this.underruns++; this.underrunSamples += n - m; this.playing = false;
      }
    }
    for (let c = 1; c < out.length; c++) out[c].set(out[0]);
    if (currentTime - this.lastReport >= 0.25) {
      this.lastReport = currentTime;
      this.port.postMessage({ type: "status", underruns: this.underruns,
        underrunSeconds: this.underrunSamples / sampleRate, queuedSeconds: this.size / sampleRate,
        playedSeconds: this.played / sampleRate, droppedSeconds: this.dropped / sampleRate,
        playing: this.playing });
    }
    return true;
  }
}

registerProcessor("jam-capture", CaptureProcessor);
registerProcessor("jam-player", PlayerProcessor);
