// Joining a LiveKit room instead of the direct SmallWebRTC connection, when the server has LiveKit.
//
// The server mints the token (POST /api/livekit/token) with a room configuration that dispatches
// the Parley agent with the persona and options, so this module only has to connect, publish the
// microphone and read LiveKit's own agent conventions back: the agent's audio track, transcripts
// on the "lk.transcription" text stream, the agent's state in its "lk.agent.state" attribute, and
// Parley's extras (feedback, scorecard) as JSON on "parley.persona". Everything shown goes through
// the `ui` hooks app.js passes in, so the page draws one transcript whatever the transport.
//
// livekit-client is vendored (static/vendor/) and loaded only when someone joins, so the direct
// path never downloads it.

const CLIENT_URL = "/static/vendor/livekit-client.umd.js";
const TOPIC_TRANSCRIPTION = "lk.transcription";
const TOPIC_PERSONA = "parley.persona";
const TOPIC_CHAT = "lk.chat";
const ATTR_AGENT_STATE = "lk.agent.state";
const ATTR_FINAL = "lk.transcription_final";
const ATTR_SEGMENT = "lk.segment_id";
const RPC_END_SESSION = "parley.end_session";
// The scorecard may take an LLM a while to write (app.js gives up on it at the same time).
const END_SESSION_TIMEOUT_MS = 90000;
const TOKEN_TIMEOUT_MS = 15000;
// Per tab, so a reload finds the agent still waiting for this identity (it keeps the room for
// PARLEY_ROOM_GRACE_S); a second tab is a second participant rather than a duplicate that
// LiveKit would kick the first one out for.
const IDENTITY_KEY = "parley.livekitIdentity";

// ---------------------------------------------------------------------------
// Is LiveKit on?

// {url, agent_name} when the server can hand out LiveKit tokens, null when it cannot (404: the
// PARLEY_LIVEKIT_* variables are unset) or does not answer; the page then offers the direct path only.
export async function livekitInfo() {
  try {
    const res = await fetch("/api/livekit", { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!res.ok) return null;
    const body = await res.json();
    return typeof body?.url === "string" && body.url ? body : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// The library

let clientPromise = null;

function loadClient() {
  if (window.LivekitClient) return Promise.resolve(window.LivekitClient);
  clientPromise ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = CLIENT_URL;
    script.onload = () => {
      if (window.LivekitClient) resolve(window.LivekitClient);
      else reject(new Error("The LiveKit client library did not load."));
    };
    script.onerror = () => {
      clientPromise = null; // a later Start tries again
      script.remove();
      reject(new Error("Could not load the LiveKit client library from the server."));
    };
    document.head.append(script);
  });
  return clientPromise;
}

// ---------------------------------------------------------------------------
// The token

function identity() {
  const make = () => `web-${Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
  try {
    let id = sessionStorage.getItem(IDENTITY_KEY);
    if (!id || !/^[A-Za-z0-9._-]{1,64}$/.test(id)) {
      id = make();
      sessionStorage.setItem(IDENTITY_KEY, id);
    }
    return id;
  } catch {
    return make();
  }
}

function describeDetail(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d?.msg ?? JSON.stringify(d)).join("; ");
  return JSON.stringify(detail);
}

async function fetchToken(body, signal) {
  let res;
  try {
    res = await fetch("/api/livekit/token", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (signal.aborted && signal.reason?.isTimeout) throw new Error("The server did not hand out a LiveKit token in time.");
    throw new Error(`Could not reach the server for a LiveKit token (${err?.message || err}).`);
  }
  let payload = null;
  try {
    payload = await res.json();
  } catch {
    // A proxy error page: the status code is all there is.
  }
  if (!res.ok) {
    throw new Error(describeDetail(payload?.detail) || `The server refused a LiveKit token (HTTP ${res.status}).`);
  }
  if (!payload?.token || !payload?.url) throw new Error("The server's LiveKit token answer is incomplete.");
  return payload;
}

// livekit-client's ConnectionError, in words a person can act on. Room.connect re-wraps the
// signal error and copies its `reason` but not its `reasonName`, so the name comes from the enum.
function connectError(LK, err, url) {
  const reason = LK.ConnectionErrorReason?.[err?.reason] ?? err?.reasonName;
  const detail = String(err?.message ?? err ?? "").replace(/^could not establish signal connection: /, "");
  console.warn("Parley: could not join the LiveKit room:", reason, err?.status, err?.message);
  switch (reason) {
    case "NotAllowed":
      return new Error(`The LiveKit server at ${url} refused to let this page join${detail ? `: ${detail}` : "."}`);
    case "ServerUnreachable":
      return new Error(`Could not reach the LiveKit server at ${url}. Check that it is running and that PARLEY_LIVEKIT_URL is an address this browser can open.`);
    case "Timeout":
      return new Error(`The LiveKit server at ${url} did not answer in time.`);
    default:
      return new Error(`Could not join the LiveKit room at ${url}: ${detail}`);
  }
}

// ---------------------------------------------------------------------------
// One call: the page in one LiveKit room

// ui: {
//   status(text, kind)              connection progress for the status line
//   agentJoined(), agentLeft()      the agent participant came / went
//   agentAudio(stream)              the agent's voice, a MediaStream to play
//   agentState(state)               "lk.agent.state": listening / thinking / speaking / …
//   userText(text, final)           the person's words, interim then final
//   agentText(delta), agentDone()   the agent's reply as it streams, then its end
//   personaMessage(payload)         feedback, corrections, scorecard…: app.js's server messages
//   disconnected(message)           the room ended without the page asking
// }
export class LiveKitCall {
  constructor(ui) {
    this.ui = ui;
    this.room = null;
    this.url = null;
    this.roomName = null;
    this.identity = null;
    this.agent = null;
    this.connected = false;
    this.left = false;
    this.finalSegments = new Set();
    this.others = new Map(); // other people's audio elements, by track sid
    this.abort = new AbortController();
  }

  // Resolves once connected with the microphone published; rejects with a readable Error.
  async join({ room, persona, options, userToken, mic }) {
    const ui = this.ui;
    ui.status("Requesting a LiveKit token…", "connecting");
    const timer = setTimeout(() => this.abort.abort(Object.assign(new Error("timeout"), { isTimeout: true })), TOKEN_TIMEOUT_MS);
    let grant;
    try {
      grant = await fetchToken({ room, identity: identity(), persona, options, user_token: userToken }, this.abort.signal);
    } finally {
      clearTimeout(timer);
    }
    this.url = grant.url;
    this.roomName = grant.room;
    this.identity = grant.identity;
    if (this.left) return;

    const LK = await loadClient();
    if (this.left) return;
    const lkRoom = new LK.Room({ adaptiveStream: false, dynacast: false });
    this.room = lkRoom;
    this.wire(LK, lkRoom);

    ui.status(`Joining LiveKit room ${grant.room}…`, "connecting");
    try {
      await lkRoom.connect(grant.url, grant.token, { autoSubscribe: true });
    } catch (err) {
      if (this.left) return;
      throw connectError(LK, err, grant.url);
    }
    if (this.left) {
      lkRoom.disconnect().catch(() => {});
      return;
    }
    this.connected = true;
    // Our own track rather than the SDK's: app.js meters the same stream it acquired.
    await lkRoom.localParticipant.publishTrack(mic.getAudioTracks()[0], {
      source: LK.Track.Source.Microphone,
      name: "microphone",
    });
    if (this.left) return;
    const agent = [...lkRoom.remoteParticipants.values()].find((p) => p.isAgent);
    if (agent) this.onAgent(agent);
    else ui.status("In the LiveKit room, waiting for the agent…", "connecting");
  }

  wire(LK, room) {
    const E = LK.RoomEvent;
    const ui = this.ui;
    room
      .on(E.ParticipantConnected, (p) => {
        if (p.isAgent && !this.agent) this.onAgent(p);
      })
      .on(E.ParticipantDisconnected, (p) => {
        if (p !== this.agent) return;
        this.agent = null;
        ui.agentLeft();
      })
      .on(E.ParticipantAttributesChanged, (changed, p) => {
        if (p === this.agent && ATTR_AGENT_STATE in changed) ui.agentState(changed[ATTR_AGENT_STATE]);
      })
      .on(E.TrackSubscribed, (track, publication, p) => {
        if (track.kind !== "audio") return;
        if (p.isAgent) {
          ui.agentAudio(new MediaStream([track.mediaStreamTrack]));
        } else {
          // Someone else in a shared room: heard like in any call, not metered.
          const el = track.attach();
          el.hidden = true;
          document.body.append(el);
          this.others.set(publication.trackSid, track);
        }
      })
      .on(E.TrackUnsubscribed, (track, publication) => {
        if (this.others.delete(publication.trackSid)) track.detach().forEach((el) => el.remove());
      })
      .on(E.Reconnecting, () => ui.status("LiveKit connection interrupted, reconnecting…", "warning"))
      .on(E.Reconnected, () => ui.status(this.agent ? "Connected via LiveKit" : "In the LiveKit room, waiting for the agent…",
        this.agent ? "connected" : "connecting"))
      .on(E.Disconnected, (reason) => {
        if (this.left || !this.connected) return; // our own leave, or a failed join that join() reports
        this.connected = false;
        const why = LK.DisconnectReason?.[reason];
        ui.disconnected(why && why !== "UNKNOWN_REASON"
          ? `Left the LiveKit room (${why.toLowerCase().replace(/_/g, " ")}).`
          : "Left the LiveKit room: the connection ended.");
      });

    room.registerTextStreamHandler(TOPIC_TRANSCRIPTION, (reader, from) => {
      this.onTranscription(reader, from.identity).catch((err) => console.error("Parley: transcript stream", err));
    });
    room.registerTextStreamHandler(TOPIC_PERSONA, (reader, from) => {
      if (!this.isAgent(from.identity)) return;
      reader.readAll().then((raw) => {
        if (!this.left) ui.personaMessage(JSON.parse(raw));
      }).catch((err) => console.error("Parley: persona message", err));
    });
  }

  isAgent(identity) {
    return Boolean(this.room?.remoteParticipants.get(identity)?.isAgent);
  }

  onAgent(p) {
    this.agent = p;
    this.ui.agentJoined();
    const state = p.attributes?.[ATTR_AGENT_STATE];
    if (state) this.ui.agentState(state);
  }

  // The agent transcribes the person on their behalf, one stream per update of a segment (the
  // last marked final), and writes its own reply as one stream of deltas.
  async onTranscription(reader, sender) {
    const attrs = reader.info.attributes ?? {};
    if (sender === this.identity) {
      const segment = attrs[ATTR_SEGMENT];
      const final = attrs[ATTR_FINAL] === "true";
      const text = await reader.readAll();
      if (this.left) return;
      // An interim overtaken by its segment's final must not bring the words back as live text.
      if (segment && this.finalSegments.has(segment)) return;
      if (final && segment) this.finalSegments.add(segment);
      this.ui.userText(text, final);
    } else if (this.isAgent(sender)) {
      for await (const delta of reader) {
        if (this.left) return;
        this.ui.agentText(delta);
      }
      if (!this.left) this.ui.agentDone();
    }
    // Anyone else's transcript (another agent, another person's captions) is not this conversation.
  }

  // Typed text is a turn for the agent (it reads "lk.chat"). False when not connected.
  sendText(text, onError) {
    if (!this.connected || !this.room) return false;
    this.room.localParticipant.sendText(text, { topic: TOPIC_CHAT }).catch(onError);
    return true;
  }

  // The agent answers with the scorecard or summary; it also arrives on "parley.persona", which is
  // what the page draws, so only a failure matters here.
  async endSession() {
    if (!this.connected || !this.agent) throw new Error("The agent is not in the room.");
    await this.room.localParticipant.performRpc({
      destinationIdentity: this.agent.identity,
      method: RPC_END_SESSION,
      payload: "{}",
      responseTimeout: END_SESSION_TIMEOUT_MS,
    });
  }

  // Stop: tells the server we left (the agent ends the conversation after its grace period) and
  // releases everything, also halfway through joining.
  leave() {
    if (this.left) return;
    this.left = true;
    this.connected = false;
    this.abort.abort();
    for (const track of this.others.values()) track.detach().forEach((el) => el.remove());
    this.others.clear();
    this.room?.disconnect().catch(() => {});
  }
}
