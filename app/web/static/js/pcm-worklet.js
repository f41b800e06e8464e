// AudioWorklet processor: the microphone (any rate, any channel count) -> 16 kHz mono 16-bit PCM,
// posted to the page as 20-ms frames ({pcm: ArrayBuffer, rms, peak}).
//
// Resampling is band-limited: each output sample is a Hann-windowed sinc interpolation of the
// mono mix at its fractional input position, with the cut-off below the output's Nyquist
// frequency (so 48 kHz speech does not alias into the 0-8 kHz band the ASR hears). At equal rates
// the kernel is the identity. Cost: 2 * HALF_WIDTH * ratio multiply-adds per output sample (a table
// look-up each, no trigonometry at run time).
//
// Runs on the audio rendering thread: no allocation per quantum beyond the posted frames.

const HALF_WIDTH = 16; // kernel half-width, in output samples
const TABLE_STEPS = 256; // kernel table entries per input sample (nearest entry is used)

class PcmDownsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = Math.round((this.outRate * (opts.frameMs || 20)) / 1000);
    this.step = sampleRate / this.outRate; // input samples per output sample
    this.cutoff = Math.min(1, 1 / this.step) * (this.step > 1 ? 0.92 : 1); // of the input Nyquist
    this.half = Math.ceil(HALF_WIDTH * Math.max(1, this.step)); // in input samples
    this.table = new Float32Array(this.half * TABLE_STEPS + 1);
    for (let i = 0; i < this.table.length; i++) this.table[i] = this.kernelAt(i / TABLE_STEPS);
    this.buf = new Float32Array(8192);
    this.bufLen = 0;
    this.bufStart = 0; // absolute input index of buf[0]
    this.next = 0; // absolute input position of the next output sample
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.sumSq = 0;
    this.peak = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
  }

  kernel(d) {
    const i = Math.round(Math.abs(d) * TABLE_STEPS);
    return i < this.table.length ? this.table[i] : 0;
  }

  kernelAt(d) {
    const u = d / this.half;
    if (u <= -1 || u >= 1) return 0;
    const x = this.cutoff * d;
    const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
    return this.cutoff * sinc * 0.5 * (1 + Math.cos(Math.PI * u));
  }

  append(input) {
    const n = input[0].length;
    if (this.bufLen + n > this.buf.length) {
      // drop what no future output needs, then grow if still short
      const keep = Math.max(0, Math.floor(this.next) - this.half - 1 - this.bufStart);
      this.buf.copyWithin(0, keep, this.bufLen);
      this.bufLen -= keep;
      this.bufStart += keep;
      if (this.bufLen + n > this.buf.length) {
        const bigger = new Float32Array(2 * (this.bufLen + n));
        bigger.set(this.buf.subarray(0, this.bufLen));
        this.buf = bigger;
      }
    }
    const channels = input.length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels; c++) s += input[c][i];
      this.buf[this.bufLen + i] = s / channels;
    }
    this.bufLen += n;
  }

  emit(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.sumSq += v * v;
    this.peak = Math.max(this.peak, Math.abs(v));
    // the scale soundfile and the server use: x * 32768, clipped
    this.frame[this.fill++] = Math.max(-32768, Math.min(32767, Math.round(v * 32768)));
    if (this.fill === this.frameSamples) {
      const rms = Math.sqrt(this.sumSq / this.frameSamples);
      this.port.postMessage({ pcm: this.frame.buffer, rms, peak: this.peak }, [this.frame.buffer]);
      this.frame = new Int16Array(this.frameSamples);
      this.fill = 0;
      this.sumSq = 0;
      this.peak = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.running) return false;
    if (!input || input.length === 0 || input[0].length === 0) return true; // no source yet
    this.append(input);
    const end = this.bufStart + this.bufLen; // absolute index after the last input sample
    while (this.next + this.half < end) {
      const t = this.next;
      const lo = Math.max(this.bufStart, Math.ceil(t - this.half));
      const hi = Math.min(end - 1, Math.floor(t + this.half));
      let acc = 0;
      let norm = 0;
      for (let k = lo; k <= hi; k++) {
        const w = this.kernel(t - k);
        acc += this.buf[k - this.bufStart] * w;
        norm += w;
      }
      this.emit(norm > 0 ? acc / norm : 0);
      this.next += this.step;
    }
    return true;
  }
}

registerProcessor("pcm-downsampler", PcmDownsampler);
