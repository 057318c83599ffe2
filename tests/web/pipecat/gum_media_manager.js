// A small getUserMedia-based media manager for SmallWebRTCTransport.
//
// Why: SmallWebRTCTransport's default media manager (DailyMediaManager) calls
// daily-js startCamera(), which downloads Daily's call-machine bundle from the
// internet and never settles offline. Pass an instance of this class instead:
//
//   new SmallWebRTCTransport({ mediaManager: new GumMediaManager(), ... })
//
// The transport duck-types its media manager (the abstract MediaManager class
// of @pipecat-ai/transport-lib is not exported by small-webrtc-transport), so
// this class implements the whole interface itself.
//
// Microphone tracks and reconnects: on every offer retry / restart_pc the
// transport builds a new RTCPeerConnection, puts tracks().local.audio on it,
// and only then closes the old connection, which stop()s every sender track of
// the old connection. If tracks() handed out the same track twice, the new
// connection's microphone would be dead. So tracks().local.audio returns a
// fresh clone of the captured track each time it is read (lazily, through a
// getter, so reading .local.video does not create audio clones). All clones
// are stopped on disconnect().
import { DeviceError } from "@pipecat-ai/client-js";

const LOCAL = { id: "local", name: "", local: true };

function deviceErrorFrom(err) {
  const name = err && err.name;
  let type = "unknown";
  if (name === "NotAllowedError" || name === "SecurityError") type = "permissions";
  else if (name === "NotFoundError" || name === "OverconstrainedError") type = "not-found";
  else if (name === "NotReadableError" || name === "AbortError") type = "in-use";
  else if (name === "TypeError") type = "undefined-mediadevices";
  return new DeviceError(["mic"], type, err && err.message, err ? { sourceError: err } : undefined);
}

export class GumMediaManager {
  /**
   * @param {object} [opts]
   * @param {MediaTrackConstraints} [opts.audio] getUserMedia audio constraints
   *   (default: echoCancellation, noiseSuppression, autoGainControl on).
   */
  constructor(opts = {}) {
    this._audioConstraints = opts.audio || {
      echoCancellation: true,
      noiseSuppression: true,
      autoGainControl: true,
    };
    this._options = undefined;
    this._callbacks = {};
    this._micEnabled = true;
    this._camEnabled = false;
    this._supportsScreenShare = false;
    this._master = null; // the captured MediaStreamTrack (never sent itself)
    this._clones = new Set(); // clones handed to peer connections
    this._selectedMic = {};
    this._userAudioCallback = undefined;
    this.lastError = null;
  }

  // ---- wiring called by the transport -------------------------------------
  setUserAudioCallback(cb) {
    this._userAudioCallback = cb;
  }

  setClientOptions(options, override = false) {
    if (this._options && !override) return;
    this._options = options;
    this._callbacks = options.callbacks || {};
    this._micEnabled = options.enableMic ?? true;
    this._camEnabled = false; // this manager never captures video
  }

  get supportsScreenShare() {
    return this._supportsScreenShare;
  }

  /** Called by PipecatClient.initDevices() (and implicitly by connect()). */
  async initialize() {
    if (this._micEnabled) await this._acquire();
    await this._reportDevices();
  }

  /** Called by the transport at the start of every connect(). */
  async connect() {
    if (this._micEnabled && !this._live(this._master)) await this._acquire();
  }

  /** Called by the transport when it stops (disconnect, fatal failure). */
  async disconnect() {
    for (const t of this._clones) t.stop();
    this._clones.clear();
    if (this._master) {
      this._master.stop();
      this._callbacks.onTrackStopped?.(this._master, LOCAL);
    }
    this._master = null;
  }

  tracks() {
    const self = this;
    const local = {};
    Object.defineProperty(local, "audio", {
      enumerable: true,
      get() {
        return self._takeClone();
      },
    });
    return { local };
  }

  // ---- the rest of the MediaManager interface -------------------------------
  async userStartedSpeaking() {}
  bufferBotAudio() {
    return undefined;
  }

  async getAllMics() {
    return this._devices("audioinput");
  }
  async getAllCams() {
    return this._devices("videoinput");
  }
  async getAllSpeakers() {
    return this._devices("audiooutput");
  }

  async updateMic(micId) {
    this._audioConstraints = { ...this._audioConstraints, deviceId: micId ? { exact: micId } : undefined };
    if (this._master) {
      this._master.stop();
      this._master = null;
      await this._acquire();
    }
  }
  updateCam() {}
  updateSpeaker() {}

  get selectedMic() {
    return this._selectedMic;
  }
  get selectedCam() {
    return {};
  }
  get selectedSpeaker() {
    return {};
  }

  enableMic(enable) {
    this._micEnabled = enable;
    for (const t of [this._master, ...this._clones]) if (t) t.enabled = enable;
  }
  enableCam() {
    console.warn("GumMediaManager does not capture video");
  }
  enableScreenShare() {
    console.warn("GumMediaManager does not support screen sharing");
  }

  get isCamEnabled() {
    return false;
  }
  get isMicEnabled() {
    return this._micEnabled;
  }
  get isSharingScreen() {
    return false;
  }

  /** The captured microphone track (for meters in a page); never stopped by the transport. */
  get micTrack() {
    return this._master;
  }

  // ---- internals -------------------------------------------------------------
  _live(t) {
    return !!t && t.readyState === "live";
  }

  _takeClone() {
    if (!this._live(this._master)) return undefined;
    for (const t of this._clones) if (!this._live(t)) this._clones.delete(t);
    const clone = this._master.clone();
    clone.enabled = this._micEnabled;
    this._clones.add(clone);
    return clone;
  }

  async _acquire() {
    try {
      if (!navigator.mediaDevices?.getUserMedia) {
        throw Object.assign(new TypeError("navigator.mediaDevices is undefined"), { name: "TypeError" });
      }
      const stream = await navigator.mediaDevices.getUserMedia({ audio: this._audioConstraints, video: false });
      const track = stream.getAudioTracks()[0];
      this._master = track;
      this.lastError = null;
      track.enabled = this._micEnabled;
      const settings = track.getSettings ? track.getSettings() : {};
      const mics = await this._devices("audioinput");
      this._selectedMic = mics.find((d) => d.deviceId === settings.deviceId) || {
        deviceId: settings.deviceId || "default",
        groupId: settings.groupId || "",
        kind: "audioinput",
        label: track.label,
      };
      this._callbacks.onMicUpdated?.(this._selectedMic);
      this._callbacks.onTrackStarted?.(track, LOCAL);
    } catch (err) {
      // Do not throw: PipecatClient.connect() awaits initDevices() outside its
      // try/catch, so a throw here would leave connect() pending forever.
      this.lastError = err;
      console.error("GumMediaManager: getUserMedia failed", err);
      this._callbacks.onDeviceError?.(deviceErrorFrom(err));
    }
  }

  async _devices(kind) {
    try {
      const all = await navigator.mediaDevices.enumerateDevices();
      return all.filter((d) => d.kind === kind);
    } catch {
      return [];
    }
  }

  async _reportDevices() {
    this._callbacks.onAvailableMicsUpdated?.(await this._devices("audioinput"));
    this._callbacks.onAvailableCamsUpdated?.([]);
    this._callbacks.onAvailableSpeakersUpdated?.(await this._devices("audiooutput"));
  }
}
