// Runs on the audio thread: the microphone's float blocks become 20 ms chunks of mono
// 16-bit little-endian PCM, posted to the page, which sends each as one WebSocket message.
class PcmS16le extends AudioWorkletProcessor {
  constructor() {
    super();
    this.samples = Math.round(sampleRate / 50);
    this.chunk = new DataView(new ArrayBuffer(this.samples * 2));
    this.filled = 0;
  }

  process([channels]) {
    // No channels while the source is not connected yet.
    const count = channels.length;
    const frames = count ? channels[0].length : 0;
    for (let i = 0; i < frames; i++) {
      let sum = 0;
      for (let c = 0; c < count; c++) sum += channels[c][i];
      const sample = Math.max(-1, Math.min(1, sum / count));
      this.chunk.setInt16(2 * this.filled++, Math.round(sample * 32767), true);
      if (this.filled === this.samples) {
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new DataView(new ArrayBuffer(this.samples * 2));
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-s16le", PcmS16le);
