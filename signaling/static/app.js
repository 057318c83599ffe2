// Parley web client: one SmallWebRTC peer connection to the agent, RTVI messages on the
// "chat" data channel. Plain ES module, no dependencies, works offline. When the server has LiveKit,
// the person may join a LiveKit room instead (livekit.js); both draw the same transcript.

import {
  $, correctionBody, deliveryLine, feedbackCard, h, metricsSpan, num, personaById, personas, scorecardCard, setCatalog,
  signedRoom, srOnly, summaryCard, text, userToken, vocabularyItem,
} from "./common.js";
import { LiveKitCall, livekitInfo } from "./livekit.js";

const ICE_GATHERING_TIMEOUT_MS = 3000;
const OFFER_TIMEOUT_MS = 30000;
const METER_INTERVAL_MS = 50;
// An interim transcript that is never finalized (a cough the server dropped) would otherwise
// sit at the bottom of the transcript forever.
const STALE_INTERIM_MS = 6000;
const STORAGE_KEY = "parley.setup";
// The scorecard or summary may take a while (an LLM reading the whole interview), not forever.
const END_SESSION_TIMEOUT_MS = 90000;

const STATE_LABELS = {
  idle: "idle",
  listening: "listening",
  user_speaking: "user speaking",
  thinking: "thinking",
  speaking: "speaking",
};

const els = {
  status: $("status"),
  error: $("error"),
  setupForm: $("setup-form"),
  persona: $("persona"),
  personaDescription: $("persona-description"),
  personaOptions: $("persona-options"),
  room: $("room"),
  transportField: $("transport-field"),
  transportHint: $("transport-hint"),
  newRoom: $("new-room"),
  start: $("start"),
  stop: $("stop"),
  micLevel: $("mic-level"),
  micFill: document.querySelector("#mic-level .meter-fill"),
  agentState: $("agent-state"),
  transcript: $("transcript"),
  textForm: $("text-form"),
  textInput: $("text-input"),
  send: $("send"),
  botAudio: $("bot-audio"),
  endSession: $("end-session"),
  feedbackPanel: $("feedback-panel"),
  feedbackEmpty: $("feedback-empty"),
  reportSlot: $("report-slot"),
  answersSection: $("answers-section"),
  feedbackList: $("feedback-list"),
  correctionsSection: $("corrections-section"),
  correctionsList: $("corrections-list"),
  vocabularySection: $("vocabulary-section"),
  vocabularyList: $("vocabulary-list"),
  reportDialog: $("report-dialog"),
  reportDialogBody: $("report-dialog-body"),
};

// Hooks for automated tests and for poking around in the console.
const parley = {
  events: [], // every RTVI message received, in order
  feedback: [], // every feedback, correction, vocabulary, scorecard and summary payload, in order
  botAudioLevel: 0, // max RMS (0..1) of the agent's audio seen so far
  botAudioLevelNow: 0,
  micLevel: 0,
  state: "idle",
  get pc() {
    return session?.pc ?? null;
  },
  get livekit() {
    return session?.livekit ?? null;
  },
  // Handles one RTVI message as if the agent had sent it (for tests and the console).
  handleMessage(msg) {
    const parsed = typeof msg === "string" ? JSON.parse(msg) : msg;
    handleMessage(session ?? { closed: true }, { label: "rtvi-ai", ...parsed });
  },
};
window.parley = parley;

let personasLoaded = false;
let session = null;

// ---------------------------------------------------------------------------
// Small helpers

function randomId(length = 12) {
  // crypto.randomUUID only exists in secure contexts; getRandomValues works everywhere.
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  const bytes = crypto.getRandomValues(new Uint8Array(length));
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
}

function randomRoom() {
  return `room-${randomId(8)}`;
}

function setStatus(text, kind = "idle") {
  els.status.textContent = text;
  els.status.dataset.state = kind;
}

function showError(text) {
  els.error.textContent = text;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.hidden = true;
}

function errorMessage(err) {
  if (err?.name === "NotAllowedError") return "Microphone permission was denied.";
  if (err?.name === "NotFoundError") return "No microphone was found.";
  if (err?.name === "NotReadableError") return "The microphone is in use by another application.";
  if (err?.name === "AbortError" && err?.isTimeout) return "The server did not answer in time.";
  return err?.message || String(err);
}

function loadSaved() {
  try {
    return JSON.parse(localStorage.getItem(STORAGE_KEY)) || {};
  } catch {
    return {};
  }
}

function save(value) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(value));
  } catch {
    // Private mode or storage disabled: remembering the choice is only a convenience.
  }
}

// ---------------------------------------------------------------------------
// Persona picker, rendered from whatever /api/personas describes

// The list also goes to common.js's catalog, where the reports look up language names.
async function loadPersonas() {
  try {
    const res = await fetch("/api/personas", { headers: { Accept: "application/json" } });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    setCatalog(Array.isArray(body?.personas) ? body.personas : []);
    if (!personas().length) throw new Error("the server offers no persona");
  } catch (err) {
    els.persona.replaceChildren(new Option("Unavailable", ""));
    showError(`Could not load personas (${errorMessage(err)}). Reload the page to try again.`);
    return;
  }
  personasLoaded = true;
  const saved = loadSaved();
  els.persona.replaceChildren(...personas().map((p) => new Option(p.name || p.id, p.id)));
  if (personas().some((p) => p.id === saved.persona)) els.persona.value = saved.persona;
  renderPersonaOptions(saved.persona === els.persona.value ? saved.options : undefined);
  updateControls();
}

function currentPersona() {
  return personaById(els.persona.value);
}

function optionType(option) {
  const type = option.type ?? "choice";
  // A choice without choices can only be typed in.
  if (type === "choice" && !(Array.isArray(option.choices) && option.choices.length)) return "text";
  return ["choice", "number", "boolean", "text"].includes(type) ? type : "text";
}

function optionControl(option, wanted) {
  const type = optionType(option);
  let control;
  if (type === "choice") {
    control = document.createElement("select");
    for (const choice of option.choices) {
      const value = typeof choice === "object" ? choice.id : choice;
      const label = typeof choice === "object" ? choice.label || choice.id : choice;
      control.append(new Option(label, value));
    }
    const values = Array.from(control.options, (o) => o.value);
    control.value = values.includes(wanted) ? wanted : (option.default ?? values[0]);
  } else if (type === "number") {
    control = document.createElement("input");
    control.type = "number";
    control.inputMode = "numeric";
    control.step = "1";
    if (Number.isFinite(option.min)) control.min = String(option.min);
    if (Number.isFinite(option.max)) control.max = String(option.max);
    const value = Number.isFinite(Number(wanted)) && wanted !== "" ? wanted : option.default;
    control.value = value ?? "";
  } else if (type === "boolean") {
    control = document.createElement("input");
    control.type = "checkbox";
    control.checked = typeof wanted === "boolean" ? wanted : Boolean(option.default);
  } else {
    control = document.createElement("input");
    control.type = "text";
    control.autocomplete = "off";
    control.value = wanted ?? "";
  }
  control.dataset.type = type;
  return control;
}

function renderPersonaOptions(savedOptions = {}) {
  const persona = currentPersona();
  els.personaDescription.textContent = persona?.description ?? "";
  const fields = (persona?.options ?? []).map((option) => {
    const id = `option-${option.name}`;
    const control = optionControl(option, savedOptions?.[option.name] ?? option.default);
    control.id = id;
    control.name = option.name;
    control.dataset.option = option.name;

    const field = document.createElement("div");
    field.className = "field";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = option.label || option.name;

    if (control.type === "checkbox") {
      field.classList.add("field-check");
      field.append(control, label);
    } else {
      if (control.dataset.type === "text") control.placeholder = "Optional";
      field.append(label, control);
    }
    let help = option.help;
    if (!help && control.type === "number" && control.min && control.max) help = `${control.min} to ${control.max}`;
    if (help) {
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.id = `${id}-help`;
      hint.textContent = help;
      control.setAttribute("aria-describedby", hint.id);
      field.append(hint);
    }
    return field;
  });
  els.personaOptions.replaceChildren(...fields);
}

// The chosen options, typed as the server expects them: numbers as numbers, booleans as
// booleans, empty text left out.
function collectOptions() {
  const options = {};
  for (const control of els.personaOptions.querySelectorAll("[data-option]")) {
    const name = control.dataset.option;
    if (control.type === "checkbox") {
      options[name] = control.checked;
    } else if (control.type === "number") {
      if (control.value !== "" && Number.isFinite(control.valueAsNumber)) options[name] = control.valueAsNumber;
    } else if (control.dataset.type === "text") {
      const text = control.value.trim();
      if (text) options[name] = text;
    } else {
      options[name] = control.value;
    }
  }
  return options;
}

// The first option the browser considers invalid (a number out of range), with why.
function invalidOption() {
  for (const control of els.personaOptions.querySelectorAll("[data-option]")) {
    if (control.checkValidity()) continue;
    const label = els.personaOptions.querySelector(`label[for="${control.id}"]`)?.textContent ?? control.name;
    let why = "is not valid";
    if (control.type === "number") {
      why = control.min && control.max ? `must be a whole number from ${control.min} to ${control.max}` : "must be a whole number";
    }
    return { control, message: `${label} ${why}.` };
  }
  return null;
}

// ---------------------------------------------------------------------------
// Controls

function updateControls() {
  const active = Boolean(session);
  const connecting = active && !session.botReady;
  // While the connection is interrupted the user may press Start to reconnect.
  const canRestart = active && session.canRestart;
  els.start.disabled = !personasLoaded || (active && !canRestart);
  els.start.textContent = canRestart ? "Reconnect" : "Start";
  els.stop.disabled = !active;
  for (const el of [els.persona, els.room, els.newRoom, ...els.personaOptions.querySelectorAll("[data-option]"),
    ...els.transportField.querySelectorAll("input")]) {
    el.disabled = !personasLoaded || (active && !canRestart);
  }
  const canType = active && session.botReady && (session.dc?.readyState === "open" || Boolean(session.livekit?.connected));
  els.textInput.disabled = !canType;
  els.send.disabled = !canType;
  const ending = Boolean(active && session.endRequest);
  els.endSession.disabled = !canType || ending;
  els.endSession.classList.toggle("is-busy", ending);
  els.endSession.setAttribute("aria-busy", String(ending));
  els.endSession.querySelector(".btn-label").textContent = ending ? "Preparing your feedback…" : "End session";
  els.setupForm.setAttribute("aria-busy", String(connecting));
}

function setAgentState(state) {
  parley.state = state;
  els.agentState.dataset.state = state;
  els.agentState.textContent = STATE_LABELS[state] ?? String(state).replace(/_/g, " ");
}

// ---------------------------------------------------------------------------
// Transcript

const transcript = {
  pending: null, // the entry holding the live interim transcript, always kept last
  agentBubble: null, // the agent bubble that bot-output appends to, until the next user turn
  lastAgentBubble: null,
  lastUserEntry: null, // the latest final user line's entry, where delivery and corrections go
  pendingMetrics: null, // turn metrics that arrived before their bubble
  staleTimer: 0,
};

function isNearBottom() {
  const t = els.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
}

function withScroll(fn) {
  const stick = isNearBottom();
  const result = fn();
  if (stick) els.transcript.scrollTop = els.transcript.scrollHeight;
  return result;
}

function appendEntry(entry) {
  withScroll(() => {
    els.transcript.querySelector(".empty-hint")?.remove();
    // New lines go above the live interim so the words being spoken stay at the bottom.
    if (transcript.pending) els.transcript.insertBefore(entry, transcript.pending);
    else els.transcript.append(entry);
  });
  return entry;
}

function makeEntry(who) {
  const entry = document.createElement("div");
  entry.className = `entry from-${who}`;
  // Announced by screen readers, kept out of the line itself so its text is just the words.
  const speaker = document.createElement("span");
  speaker.className = "visually-hidden";
  speaker.textContent = who === "user" ? "You: " : "Agent: ";
  const line = document.createElement("p");
  line.className = `line ${who}`;
  line.dir = "auto";
  entry.append(speaker, line);
  return { entry, line };
}

function addUserLine(text, { typed = false } = {}) {
  const { entry, line } = makeEntry("user");
  line.textContent = text;
  if (typed) {
    line.classList.add("typed");
    // The server echoes typed text as a final transcription: that echo is this line, not a new one.
    transcript.awaitingEcho = text.trim();
  }
  appendEntry(entry);
  transcript.lastUserEntry = entry;
  endAgentBubble();
  return line;
}

function showInterim(text) {
  clearTimeout(transcript.staleTimer);
  withScroll(() => {
    if (!transcript.pending) {
      const { entry, line } = makeEntry("user");
      line.classList.add("interim");
      // Interim words change many times a second: too chatty for a live region.
      entry.setAttribute("aria-hidden", "true");
      els.transcript.querySelector(".empty-hint")?.remove();
      els.transcript.append(entry);
      transcript.pending = entry;
    }
    transcript.pending.querySelector(".line").textContent = text;
  });
}

function finalizeUserText(text) {
  clearTimeout(transcript.staleTimer);
  if (!transcript.pending && transcript.awaitingEcho && text.trim() === transcript.awaitingEcho) {
    transcript.awaitingEcho = null;
    return;
  }
  const pending = transcript.pending;
  transcript.pending = null;
  if (!text.trim()) {
    pending?.remove();
    return;
  }
  const { entry, line } = makeEntry("user");
  line.textContent = text;
  // A fresh node rather than an edited one, so the log region announces it.
  if (pending) withScroll(() => pending.replaceWith(entry));
  else appendEntry(entry);
  transcript.lastUserEntry = entry;
  endAgentBubble();
}

function dropInterim() {
  clearTimeout(transcript.staleTimer);
  transcript.pending?.remove();
  transcript.pending = null;
}

function endAgentBubble() {
  transcript.agentBubble = null;
}

function newAgentBubble() {
  const { entry, line } = makeEntry("agent");
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.hidden = true;
  entry.append(meta);
  const bubble = { entry, line, meta, text: "", interrupted: false };
  appendEntry(entry);
  transcript.agentBubble = bubble;
  transcript.lastAgentBubble = bubble;
  if (transcript.pendingMetrics) {
    showMetrics(bubble, transcript.pendingMetrics);
    transcript.pendingMetrics = null;
  }
  return bubble;
}

const CJK = /[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]/;

function joinText(a, b) {
  if (!a) return b.trimStart();
  if (!b) return a;
  if (/\s$/.test(a) || /^\s/.test(b) || /^[,.;:!?…)\]}'’”]/.test(b)) return a + b;
  if (CJK.test(a.at(-1)) && CJK.test(b[0])) return a + b;
  return `${a} ${b}`;
}

function addAgentText(text) {
  if (typeof text !== "string" || !text) return;
  const bubble = transcript.agentBubble ?? newAgentBubble();
  bubble.text = joinText(bubble.text, text);
  withScroll(() => {
    bubble.line.textContent = bubble.text;
  });
}

function addMetaItem(bubble, node) {
  if (bubble.meta.childNodes.length) bubble.meta.append(" · ");
  bubble.meta.append(node);
  bubble.meta.hidden = false;
}

function showMetrics(bubble, m) {
  const span = metricsSpan(m);
  if (!span) return;
  bubble.meta.querySelector(".metrics")?.remove();
  withScroll(() => addMetaItem(bubble, span));
}

function handleTurnMetrics(m) {
  // Metrics are measured at the first audio of the reply, which may come before or after
  // its first text; park them until the bubble exists.
  if (transcript.agentBubble) showMetrics(transcript.agentBubble, m);
  else transcript.pendingMetrics = m;
}

// Where the spoken part of `full` ends, comparing only letters and digits so punctuation and
// spacing differences between the TTS words and the displayed text don't matter. -1 when the
// spoken text is not a prefix of what is shown.
function spokenPrefixEnd(full, spoken) {
  const chars = Array.from(full);
  const isWord = (c) => /[\p{L}\p{N}]/u.test(c);
  let i = 0;
  for (const c of spoken) {
    if (!isWord(c)) continue;
    while (i < chars.length && !isWord(chars[i])) i++;
    if (i >= chars.length || chars[i].toLowerCase() !== c.toLowerCase()) return -1;
    i++;
  }
  // Keep punctuation glued to the last spoken word ("Hello," stays whole).
  while (i < chars.length && !/\s/.test(chars[i]) && !isWord(chars[i])) i++;
  return chars.slice(0, i).join("").length;
}

function markInterrupted(spokenText) {
  const bubble = transcript.lastAgentBubble;
  const spoken = typeof spokenText === "string" ? spokenText : "";
  // Interrupted before saying anything of a new reply: the last bubble was a finished one.
  if (!bubble || (!transcript.agentBubble && !spoken.trim())) {
    endAgentBubble();
    return;
  }
  const end = spokenPrefixEnd(bubble.text, spoken);
  if (end >= 0 && end < bubble.text.length) {
    const tail = bubble.text.slice(end);
    const gap = tail.match(/^\s*/)[0]; // strike the words, not the space before them
    const del = document.createElement("del");
    del.className = "unspoken";
    del.title = "Not spoken: the agent was interrupted";
    del.textContent = tail.slice(gap.length);
    bubble.line.replaceChildren(bubble.text.slice(0, end) + gap, del);
  }
  if (!bubble.interrupted) {
    bubble.interrupted = true;
    bubble.entry.classList.add("interrupted");
    const tag = document.createElement("span");
    tag.className = "interrupted-tag";
    tag.textContent = "(interrupted)";
    addMetaItem(bubble, tag);
  }
  endAgentBubble();
}

function addNotice(text) {
  const p = document.createElement("p");
  p.className = "notice";
  p.dir = "auto";
  p.textContent = text;
  return appendEntry(p);
}

// ---------------------------------------------------------------------------
// Coaching: delivery and corrections under the person's lines; per-answer feedback,
// corrections, new words and the end-of-session report in the Feedback panel

function rememberFeedback(payload) {
  parley.feedback.push(payload);
  els.feedbackEmpty.hidden = true;
}

// The transcript entry a delivery or correction belongs to: the one already tagged with its
// turn, else the latest final user line (which then takes the turn).
function userEntryFor(turn) {
  const key = num(turn) === null ? null : String(turn);
  if (key !== null) {
    const tagged = Array.from(els.transcript.querySelectorAll(".entry.from-user")).find((e) => e.dataset.turn === key);
    if (tagged) return tagged;
  }
  const entry = transcript.lastUserEntry;
  if (!entry?.isConnected) return null;
  if (key !== null && !entry.dataset.turn) entry.dataset.turn = key;
  return entry;
}

// --- Delivery: pace, fillers and pauses of one answer, as chips under it

function showDelivery(d) {
  const entry = userEntryFor(d.turn);
  const node = deliveryLine(d, { turn: text(d.turn) });
  if (!entry || !node) return;
  withScroll(() => {
    const old = entry.querySelector(":scope > .delivery");
    if (old) old.replaceWith(node);
    else entry.querySelector(".line").after(node);
  });
}

// --- Corrections

function showCorrection(c) {
  if (!text(c.corrected)) return;
  rememberFeedback(c);
  const entry = userEntryFor(c.turn);
  if (entry) {
    const inline = h("p", { class: "correction inline", dataset: { turn: text(c.turn) } }, srOnly("Correction: "), correctionBody(c));
    withScroll(() => entry.append(inline));
  }
  els.correctionsList.prepend(h("li", { class: "correction", dataset: { turn: text(c.turn) } }, correctionBody(c)));
  els.correctionsSection.hidden = false;
}

// --- New words

function showVocabulary(v) {
  const word = text(v.word);
  if (!word) return;
  rememberFeedback(v);
  const key = word.toLocaleLowerCase();
  // The same word twice: keep one entry, with the latest meaning, at the top.
  for (const item of els.vocabularyList.querySelectorAll(".vocab-item")) {
    if (item.querySelector("dt").textContent.toLocaleLowerCase() === key) item.remove();
  }
  els.vocabularyList.prepend(vocabularyItem(v));
  els.vocabularySection.hidden = false;
}

// --- Per-answer feedback cards, newest first

function showFeedback(f) {
  rememberFeedback(f);
  els.feedbackList.prepend(feedbackCard(f, { withTurn: true }));
  els.answersSection.hidden = false;
}

// --- End-of-session report: a dialog when it arrives, and a card kept in the panel

// The main page's report: "Session complete", the feedback panel's list headings, the language's
// full name. In the panel it keeps its id and a button back to the dialog; in the dialog it has
// no id, and its title takes the focus when the dialog opens.
const LIVE_REPORT = {
  eyebrow: "Session complete",
  focusTitle: true,
  listHeading: "h5",
  showPauses: false,
  showCounts: false,
  shortLanguage: false,
};
const REPORTS = {
  scorecard: { render: scorecardCard, id: "scorecard", reopen: "View full scorecard" },
  summary: { render: summaryCard, id: "session-summary", reopen: "View full summary" },
};

function reportCard(kind, payload, inPanel) {
  const { render, id, reopen } = REPORTS[kind];
  const titleId = inPanel ? `${id}-title` : "report-dialog-title";
  const card = render(payload, { ...LIVE_REPORT, id: inPanel ? id : null, titleId });
  // In the panel, a way back to the dialog once it was closed.
  if (inPanel) {
    card.append(h("div", { class: "report-actions" },
      h("button", { type: "button", class: "btn btn-ghost btn-small report-open", dataset: { report: kind } }, reopen)));
  }
  return card;
}

const reportFocus = { returnTo: null };

function showReport(kind, payload) {
  rememberFeedback(payload);
  const card = reportCard(kind, payload, true);
  const old = els.reportSlot.querySelector(`#${card.id}`);
  if (old) old.replaceWith(card);
  else els.reportSlot.prepend(card);
  openReportDialog(kind, payload);
}

function openReportDialog(kind, payload) {
  const dialog = els.reportDialog;
  els.reportDialogBody.replaceChildren(reportCard(kind, payload, false));
  if (!dialog.open) {
    reportFocus.returnTo = document.activeElement;
    dialog.showModal();
  }
  dialog.dataset.report = kind;
  els.reportDialogBody.scrollTop = 0;
  $("report-dialog-title")?.focus();
}

function onReportDialogClose() {
  const kind = els.reportDialog.dataset.report;
  els.reportDialogBody.replaceChildren();
  // Back where the person was; if that control is gone or disabled, to the report in the panel.
  const back = reportFocus.returnTo;
  reportFocus.returnTo = null;
  if (back?.isConnected && back !== document.body && !back.disabled && back.offsetParent !== null) {
    back.focus();
  } else {
    $(kind === "summary" ? "session-summary-title" : "scorecard-title")?.focus();
  }
}

// --- End session: ask the agent to wrap up; the report itself comes as a server message

function endSession() {
  const s = session;
  if (!s || s.endRequest) return;
  const id = s.livekit ? endLiveKitSession(s) : sendRtvi(s, "client-message", { t: "end-session", d: {} });
  if (!id) {
    showError("Not connected: could not end the session.");
    return;
  }
  clearError();
  s.endRequest = {
    id,
    timer: setTimeout(() => {
      if (!alive(s) || s.endRequest?.id !== id) return;
      finishEndRequest(s);
      showError("The agent did not send its feedback in time. Press End session to try again.");
    }, END_SESSION_TIMEOUT_MS),
  };
  updateControls();
}

// The report itself arrives as a persona message, like over the data channel; only a failure of
// the request is handled here. The request's id, like sendRtvi's.
function endLiveKitSession(s) {
  const id = randomId();
  s.livekit.endSession().catch((err) => {
    if (!alive(s) || s.endRequest?.id !== id) return;
    finishEndRequest(s);
    showError(`Could not end the session: ${errorMessage(err)}`);
  });
  return id;
}

function finishEndRequest(s) {
  if (!s?.endRequest) return;
  clearTimeout(s.endRequest.timer);
  s.endRequest = null;
  updateControls();
}

// ---------------------------------------------------------------------------
// Audio: the microphone meter and the agent's level

function rms(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const v of buffer) sum += v * v;
  return Math.sqrt(sum / buffer.length);
}

function makeAnalyser(ctx, stream) {
  const source = ctx.createMediaStreamSource(stream);
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  // Not connected to the destination: the <audio> element already plays the agent,
  // and the user must not hear their own microphone.
  source.connect(analyser);
  return { source, analyser, buffer: new Float32Array(analyser.fftSize) };
}

function setMicMeter(level) {
  const pct = Math.round(level * 100);
  els.micFill.style.setProperty("--level", level.toFixed(3));
  els.micLevel.setAttribute("aria-valuenow", String(pct));
  els.micLevel.dataset.level = String(pct);
}

function startMeters(s) {
  // A timer rather than requestAnimationFrame: the agent's level must keep being measured
  // in a background tab, where animation frames stop.
  s.meterTimer = setInterval(() => {
    if (s.micMeter) {
      const level = rms(s.micMeter.analyser, s.micMeter.buffer);
      parley.micLevel = level;
      // dBFS from -60 to 0 mapped onto the bar: speech is visible without shouting.
      const db = 20 * Math.log10(level || 1e-8);
      setMicMeter(Math.min(1, Math.max(0, (db + 60) / 60)));
    }
    if (s.botMeter) {
      const level = rms(s.botMeter.analyser, s.botMeter.buffer);
      parley.botAudioLevelNow = level;
      if (level > parley.botAudioLevel) parley.botAudioLevel = level;
    }
  }, METER_INTERVAL_MS);
}

async function getMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("Microphone access needs a secure page: open Parley over https or on localhost.");
  }
  return navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
}

function playBotAudio() {
  els.botAudio.play().catch((err) => {
    if (err?.name !== "NotAllowedError") return;
    // Autoplay refused: the next click anywhere counts as the gesture the browser wants.
    addNotice("Your browser blocked the agent's audio. Click anywhere on the page to hear it.");
    document.addEventListener("click", () => els.botAudio.play().catch(() => {}), { once: true });
  });
}

// ---------------------------------------------------------------------------
// Session: peer connection, signaling, data channel

function alive(s) {
  return s === session && !s.closed;
}

// The message's id when it was sent, false when the channel is not open.
function sendRtvi(s, type, data) {
  if (!s?.dc || s.dc.readyState !== "open") return false;
  const id = randomId();
  s.dc.send(JSON.stringify({ label: "rtvi-ai", type, id, data }));
  return id;
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve();
    };
    const onChange = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    // Whatever was gathered by then goes in the offer; there is no trickle to send later ones.
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", onChange);
  });
}

async function postOffer(body) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), OFFER_TIMEOUT_MS);
  let res;
  try {
    res = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
  } catch (err) {
    if (err?.name === "AbortError") throw new Error("The server did not answer the offer in time.");
    throw new Error(`Could not reach the server (${errorMessage(err)}).`);
  } finally {
    clearTimeout(timer);
  }
  let payload = null;
  try {
    payload = await res.json();
  } catch {
    // A proxy error page or an empty body: the status code is all there is to report.
  }
  if (!res.ok) {
    throw new Error(describeDetail(payload?.detail) || `The server refused the connection (HTTP ${res.status}).`);
  }
  if (!payload?.sdp) throw new Error("The server's answer has no SDP.");
  return payload;
}

function describeDetail(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  // FastAPI validation errors: [{loc: [...], msg: "..."}]
  if (Array.isArray(detail)) {
    return detail
      .map((d) => (d?.msg ? `${(d.loc ?? []).filter((p) => p !== "body").join(".")}: ${d.msg}` : JSON.stringify(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

async function start() {
  // Start doubles as "reconnect" after a failure: drop whatever is left of the old session.
  if (session) closeSession(session);
  clearError();

  const persona = els.persona.value;
  const options = collectOptions();
  const room = els.room.value.trim();
  if (!room) {
    showError("Enter a room id, or press ↻ for a new one.");
    els.room.focus();
    return;
  }
  const invalid = invalidOption();
  if (invalid) {
    showError(invalid.message);
    invalid.control.focus();
    return;
  }
  const transport = chosenTransport();
  save({ persona, options, transport });
  const url = new URL(location.href);
  url.searchParams.set("room", room);
  history.replaceState(null, "", url);

  const s = { closed: false, botReady: false, canRestart: false, serverState: false, transport };
  session = s;
  delete document.body.dataset.botReady;
  // Created inside the click handler: after the permission prompt the gesture may have expired
  // and the context would start suspended.
  s.audioCtx = new AudioContext();
  updateControls();
  setAgentState("idle");

  try {
    setStatus("Requesting microphone…", "connecting");
    const mic = await getMicrophone();
    if (!alive(s)) {
      mic.getTracks().forEach((t) => t.stop());
      return;
    }
    // A fresh stream on every start: tracks stopped by a previous session never come back.
    s.mic = mic;
    await s.audioCtx.resume().catch(() => {});
    s.micMeter = makeAnalyser(s.audioCtx, mic);
    startMeters(s);

    if (transport === "livekit") {
      await joinLiveKit(s, { room, persona, options, mic });
      return;
    }

    const pc = new RTCPeerConnection({ iceServers: [] });
    s.pc = pc;
    pc.ontrack = (event) => onTrack(s, event);
    pc.onconnectionstatechange = () => onConnectionState(s);

    // The data channel and the audio transceiver must both be in the offer: the server
    // neither opens channels nor adds m-lines. Audio first, so the agent's voice is on mid 0.
    const dc = pc.createDataChannel("chat", { ordered: true });
    s.dc = dc;
    dc.onopen = () => onChannelOpen(s);
    dc.onclose = () => onChannelClose(s);
    dc.onmessage = (event) => onChannelMessage(s, event.data);
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv", streams: [mic] });

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, ICE_GATHERING_TIMEOUT_MS);
    if (!alive(s)) return;

    setStatus("Connecting…", "connecting");
    // The anonymous token lets the server file this session under this browser's history.
    s.requestData = { room, persona, options, user_token: userToken() };
    const answer = await postOffer({
      sdp: pc.localDescription.sdp,
      type: pc.localDescription.type,
      // Every start builds a new peer connection, so there is nothing to renegotiate.
      pc_id: null,
      restart_pc: false,
      requestData: s.requestData,
    });
    if (!alive(s)) return;
    s.pcId = answer.pc_id;
    await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
  } catch (err) {
    if (!alive(s)) return;
    closeSession(s);
    setStatus("Not connected", "error");
    showError(errorMessage(err));
  }
}

function stop() {
  if (!session) return;
  closeSession(session);
  setStatus("Stopped", "idle");
}

function closeSession(s) {
  if (!s || s.closed) return;
  s.closed = true;
  if (session === s) session = null;
  clearInterval(s.meterTimer);
  for (const close of [() => s.dc?.close(), () => s.pc?.close(), () => s.livekit?.leave()]) {
    try {
      close();
    } catch {
      // Already closed by the other side.
    }
  }
  s.mic?.getTracks().forEach((t) => t.stop());
  s.audioCtx?.close().catch(() => {});
  els.botAudio.srcObject = null;
  parley.botAudioLevelNow = 0;
  parley.micLevel = 0;
  setMicMeter(0);
  dropInterim();
  endAgentBubble();
  transcript.pendingMetrics = null;
  clearTimeout(s.endRequest?.timer);
  s.endRequest = null;
  setAgentState("idle");
  updateControls();
}

function onTrack(s, event) {
  if (!alive(s) || event.track.kind !== "audio") return;
  playAgentStream(s, event.streams[0] ?? new MediaStream([event.track]));
}

function playAgentStream(s, stream) {
  els.botAudio.srcObject = stream;
  playBotAudio();
  // Chrome only feeds a remote stream into WebAudio while a media element also plays it,
  // which the <audio> element above does.
  s.botMeter?.source.disconnect();
  s.botMeter = makeAnalyser(s.audioCtx, stream);
}

function onConnectionState(s) {
  if (!alive(s)) return;
  const state = s.pc.connectionState;
  if (state === "connected") {
    s.canRestart = false;
    setStatus(s.botReady ? "Connected" : "Connected, waiting for the agent…", s.botReady ? "connected" : "connecting");
  } else if (state === "disconnected") {
    // Often transient (a network blip): keep the session but let the user force a restart.
    s.canRestart = true;
    setStatus("Connection interrupted. Waiting for it to recover; press Reconnect to start over.", "warning");
  } else if (state === "failed") {
    closeSession(s);
    setStatus("Connection failed. Press Start to reconnect.", "error");
  }
  updateControls();
}

function onChannelOpen(s) {
  if (!alive(s)) return;
  setStatus("Connected, waiting for the agent…", "connecting");
  sendRtvi(s, "client-ready", {
    version: "1.0.0",
    about: { library: "parley-web", library_version: "0.1.0", platform: "browser" },
  });
  updateControls();
}

function onChannelClose(s) {
  if (!alive(s)) return;
  // The server closes the channel when it ends the conversation.
  closeSession(s);
  setStatus("Disconnected: the session ended.", "idle");
}

function onChannelMessage(s, raw) {
  if (!alive(s) || typeof raw !== "string") return;
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    return; // e.g. "ping: …" keep-alives
  }
  handleMessage(s, msg);
}

function handleMessage(s, msg) {
  if (!msg || typeof msg !== "object") return;
  if (msg.type === "signalling" && msg.label === undefined) {
    handleSignalling(s, msg.message);
    return;
  }
  if (msg.label !== "rtvi-ai") return;
  parley.events.push(msg);
  try {
    handleRtvi(s, msg);
  } catch (err) {
    // One odd message must not take the conversation down.
    console.error("Parley: could not handle", msg, err);
  }
}

// SmallWebRTC's own control messages, as the Pipecat transport understands them.
function handleSignalling(s, message) {
  if (message?.type === "peerLeft") {
    closeSession(s);
    setStatus("The agent left the conversation.", "idle");
  } else if (message?.type === "renegotiate") {
    renegotiate(s).catch((err) => {
      if (!alive(s)) return;
      closeSession(s);
      setStatus("Not connected", "error");
      showError(`Renegotiation failed: ${errorMessage(err)}`);
    });
  }
}

// A new offer on the same peer connection; the server knows it by pc_id.
async function renegotiate(s) {
  const pc = s.pc;
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, ICE_GATHERING_TIMEOUT_MS);
  if (!alive(s)) return;
  const answer = await postOffer({
    sdp: pc.localDescription.sdp,
    type: pc.localDescription.type,
    pc_id: s.pcId ?? null,
    restart_pc: false,
    requestData: s.requestData,
  });
  if (!alive(s)) return;
  if (answer.pc_id) s.pcId = answer.pc_id;
  await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
}

function handleRtvi(s, msg) {
  const data = msg.data && typeof msg.data === "object" ? msg.data : {};
  switch (msg.type) {
    case "bot-ready":
      s.botReady = true;
      document.body.dataset.botReady = "yes";
      setStatus("Connected", "connected");
      if (!s.serverState) setAgentState("listening");
      updateControls();
      break;

    // Speaking events drive the badge only for servers that don't send Parley's own state.
    case "user-started-speaking":
      clearTimeout(transcript.staleTimer);
      if (!s.serverState) setAgentState("user_speaking");
      break;
    case "user-stopped-speaking":
      clearTimeout(transcript.staleTimer);
      if (transcript.pending) transcript.staleTimer = setTimeout(dropInterim, STALE_INTERIM_MS);
      if (!s.serverState) setAgentState("thinking");
      break;
    case "bot-started-speaking":
      if (!s.serverState) setAgentState("speaking");
      break;
    case "bot-stopped-speaking":
      if (!s.serverState) setAgentState("listening");
      break;

    case "user-transcription":
      if (typeof data.text !== "string") break;
      if (data.final) finalizeUserText(data.text);
      else showInterim(data.text);
      break;

    case "bot-output":
      addAgentText(data.text);
      break;

    case "server-message":
      handleServerMessage(s, data);
      break;

    case "server-response":
      // The answer to End session carries the report too, but it is drawn from the
      // scorecard or summary server message that comes with it.
      break;

    case "error":
    case "error-response":
      if (msg.type === "error-response") finishEndRequest(s);
      showError(`Agent error: ${data.error || "unknown error"}`);
      if (data.fatal) {
        closeSession(s);
        setStatus("Stopped after an error", "error");
      }
      break;

    default:
      // bot-llm-text, bot-tts-text, metrics and anything newer: nothing to show.
      break;
  }
}

function handleServerMessage(s, data) {
  // Accept both {type: …} and {data: {type: …}} as the payload.
  const payload = typeof data.type !== "string" && data.data && typeof data.data === "object" ? data.data : data;
  switch (payload.type) {
    case "state":
      if (typeof payload.state === "string") {
        s.serverState = true;
        setAgentState(payload.state);
      }
      break;
    case "turn-metrics":
      handleTurnMetrics(payload);
      break;
    case "interrupted":
      markInterrupted(payload.spoken_text);
      break;
    case "notice":
      if (payload.text) addNotice(String(payload.text));
      break;
    case "delivery":
      showDelivery(payload);
      break;
    case "feedback":
      showFeedback(payload);
      break;
    case "correction":
      showCorrection(payload);
      break;
    case "vocabulary":
      showVocabulary(payload);
      break;
    case "scorecard":
    case "summary":
      finishEndRequest(s);
      showReport(payload.type, payload);
      break;
    case "session-ended":
      addNotice("Session complete").title = text(payload.reason);
      break;
    default:
      break;
  }
}

function sendTypedText(event) {
  event.preventDefault();
  const text = els.textInput.value.trim();
  if (!text || !session) return;
  const s = session;
  const sent = s.livekit
    ? s.livekit.sendText(text, (err) => alive(s) && showError(`The message was not sent: ${errorMessage(err)}`))
    : sendRtvi(s, "send-text", { content: text, options: { run_immediately: true, audio_response: true } });
  if (!sent) {
    showError("Not connected: the message was not sent.");
    return;
  }
  addUserLine(text, { typed: true });
  els.textInput.value = "";
  els.textInput.focus();
}

// ---------------------------------------------------------------------------
// LiveKit: the same conversation through a LiveKit room (livekit.js), when the server has one

async function offerLiveKit() {
  const info = await livekitInfo();
  if (!info) return; // no LiveKit on this server: the direct connection is the only way
  els.transportHint.textContent = `LiveKit server: ${info.url}`;
  els.transportField.hidden = false;
  const saved = loadSaved().transport;
  const radio = els.transportField.querySelector(`input[value="${saved === "livekit" ? "livekit" : "webrtc"}"]`);
  if (radio) radio.checked = true;
}

function chosenTransport() {
  if (els.transportField.hidden) return "webrtc";
  return els.transportField.querySelector("input[name=transport]:checked")?.value === "livekit" ? "livekit" : "webrtc";
}

async function joinLiveKit(s, { room, persona, options, mic }) {
  const live = (fn) => (...args) => {
    if (alive(s)) fn(...args);
  };
  const call = new LiveKitCall({
    status: live(setStatus),
    agentJoined: live(() => {
      s.botReady = true;
      document.body.dataset.botReady = "yes";
      setStatus("Connected via LiveKit", "connected");
      if (!s.serverState) setAgentState("listening");
      updateControls();
    }),
    agentLeft: live(() => {
      closeSession(s);
      setStatus("The agent left the conversation.", "idle");
    }),
    agentAudio: live((stream) => playAgentStream(s, stream)),
    agentState: live((state) => {
      s.serverState = true;
      setAgentState(state);
    }),
    userText: live((text, final) => (final ? finalizeUserText(text) : showInterim(text))),
    agentText: live(addAgentText),
    agentDone: live(endAgentBubble),
    personaMessage: live((payload) => handleServerMessage(s, payload)),
    disconnected: live((message) => {
      closeSession(s);
      setStatus(message, "idle");
    }),
  });
  s.livekit = call;
  await call.join({ room, persona, options, userToken: userToken(), mic });
  if (alive(s)) updateControls();
}

// ---------------------------------------------------------------------------
// Wiring

function init() {
  const fromUrl = new URL(location.href).searchParams.get("room");
  els.room.value = fromUrl?.trim() || signedRoom() || randomRoom();

  els.setupForm.addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  els.stop.addEventListener("click", stop);
  els.newRoom.addEventListener("click", () => {
    els.room.value = randomRoom();
  });
  els.persona.addEventListener("change", () => renderPersonaOptions());
  els.textForm.addEventListener("submit", sendTypedText);
  els.endSession.addEventListener("click", endSession);
  els.reportSlot.addEventListener("click", (event) => {
    const kind = event.target.closest(".report-open")?.dataset.report;
    const payload = kind && parley.feedback.findLast((f) => f.type === kind);
    if (payload) openReportDialog(kind, payload);
  });
  els.reportDialog.addEventListener("close", onReportDialogClose);
  els.reportDialog.addEventListener("click", (event) => {
    if (event.target.closest("[data-close]")) {
      els.reportDialog.close();
      return;
    }
    // A click on the backdrop, outside the dialog's box, closes it too.
    const box = els.reportDialog.getBoundingClientRect();
    const inside = event.clientX >= box.left && event.clientX <= box.right && event.clientY >= box.top && event.clientY <= box.bottom;
    if (event.target === els.reportDialog && !inside) els.reportDialog.close();
  });
  window.addEventListener("pagehide", () => closeSession(session));

  setAgentState("idle");
  setMicMeter(0);
  updateControls();
  loadPersonas();
  offerLiveKit();
}

init();
