// Shared by the three pages. The main page (app.js) uses the element helpers, the persona catalog's
// labels and the feedback / scorecard / summary renderers; the History and session report pages
// also use the API with this browser's token and Chart.js (vendored, loaded as a classic script
// before the page's module) themed from style.css.

import { authHeaders } from "./identity.js";

export { userToken, authHeaders, signedRoom } from "./identity.js";

// ---------------------------------------------------------------------------
// The API

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function describeDetail(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d?.msg ?? JSON.stringify(d)).join("; ");
  return JSON.stringify(detail);
}

async function request(path, { signal, accept = "application/json" } = {}) {
  let res;
  try {
    res = await fetch(path, { headers: authHeaders({ Accept: accept }), signal, cache: "no-store" });
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(`Could not reach the server (${err?.message || err}).`, 0);
  }
  if (!res.ok) {
    let detail = "";
    try {
      detail = describeDetail((await res.json())?.detail);
    } catch {
      // A proxy error page: the status code is all there is.
    }
    throw new ApiError(detail || `The server answered HTTP ${res.status}.`, res.status);
  }
  return res;
}

export async function api(path, options) {
  const res = await request(path, options);
  try {
    return await res.json();
  } catch {
    throw new ApiError("The server's answer is not JSON.", res.status);
  }
}

// The file name the server suggests in Content-Disposition, if any.
function dispositionName(header) {
  if (!header) return "";
  const star = /filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)/.exec(header);
  if (star) {
    try {
      return decodeURIComponent(star[1].trim().replace(/^"|"$/g, ""));
    } catch {
      // Malformed: fall back to the plain filename.
    }
  }
  const plain = /filename\s*=\s*("([^"]*)"|[^;]+)/i.exec(header);
  return plain ? (plain[2] ?? plain[1]).trim() : "";
}

// Downloads need the Authorization header, so a plain link will not do: fetch, then save a Blob.
export async function download(path, fallbackName) {
  const res = await request(path, { accept: "*/*" });
  const blob = await res.blob();
  const name = (dispositionName(res.headers.get("Content-Disposition")) || fallbackName).replace(/[\\/]/g, "_");
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  // Revoked later: Chromium reads the blob after the click handler returns.
  setTimeout(() => URL.revokeObjectURL(url), 30000);
  return name;
}

// ---------------------------------------------------------------------------
// Small helpers

export const $ = (id) => document.getElementById(id);

// A small element builder: h("p", { class: "x", dataset: { a: "1" } }, "text", child…).
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && !key.startsWith("aria")) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false && c !== ""));
  return node;
}

export const text = (v) => (typeof v === "string" ? v.trim() : typeof v === "number" ? String(v) : "");
export const texts = (v) => (Array.isArray(v) ? v.map(text).filter(Boolean) : []);
export const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
export const srOnly = (words) => h("span", { class: "visually-hidden" }, words);

export function formatNumber(v, digits = 1) {
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

export function plural(n, one, many = `${one}s`) {
  return `${formatNumber(n)} ${n === 1 ? one : many}`;
}

export function capitalize(s) {
  return s ? s[0].toUpperCase() + s.slice(1) : s;
}

// "data-scientist" → "Data scientist"
export function prettify(id) {
  return capitalize(text(id).replace(/[-_]+/g, " "));
}

// ---------------------------------------------------------------------------
// Dates and durations

function toDate(iso) {
  if (!iso) return null;
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? null : d;
}

export function formatDate(iso, { year = true } = {}) {
  const d = toDate(iso);
  if (!d) return "";
  const sameYear = d.getFullYear() === new Date().getFullYear();
  return d.toLocaleDateString(undefined, { day: "numeric", month: "short", year: year && !sameYear ? "numeric" : undefined });
}

export function formatTime(iso) {
  const d = toDate(iso);
  return d ? d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }) : "";
}

export function formatDateTime(iso) {
  const d = toDate(iso);
  if (!d) return "";
  return d.toLocaleString(undefined, { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function durationSeconds(startIso, endIso) {
  const a = toDate(startIso);
  const b = toDate(endIso);
  if (!a || !b) return null;
  return Math.max(0, (b - a) / 1000);
}

export function formatDuration(seconds) {
  if (seconds === null) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

// "02:15": how far into the session something happened.
export function formatOffset(seconds) {
  if (seconds === null) return "";
  const s = Math.max(0, Math.round(seconds));
  const mm = String(Math.floor(s / 60)).padStart(2, "0");
  return `${mm}:${String(s % 60).padStart(2, "0")}`;
}

export function isoDateTimeAttr(iso) {
  const d = toDate(iso);
  return d ? d.toISOString() : "";
}

// ---------------------------------------------------------------------------
// Labels from the persona catalog (/api/personas), with fallbacks when it is unavailable

const catalog = { personas: [], loaded: false };

export async function loadCatalog() {
  let list;
  try {
    const body = await api("/api/personas");
    list = Array.isArray(body?.personas) ? body.personas : [];
  } catch {
    list = [];
  }
  return setCatalog(list);
}

// The main page fetches /api/personas itself (it reports a failure its own way) and hands the list here.
export function setCatalog(list) {
  catalog.personas = list;
  catalog.loaded = true;
  return catalog.personas;
}

export function personas() {
  return catalog.personas;
}

function choicesOf(option) {
  return (option?.choices ?? []).map((c) => (typeof c === "object" ? { id: c.id, label: c.label || c.id } : { id: c, label: c }));
}

export function personaById(id) {
  return catalog.personas.find((p) => p.id === id) ?? null;
}

// The kind of a persona id ("interviewer" | "teacher"), from the catalog or the id itself.
export function personaKind(id) {
  return personaById(id)?.kind ?? (id === "teacher" ? "teacher" : id === "interviewer" ? "interviewer" : null);
}

export function personaName(id, kind) {
  const p = personaById(id);
  if (p?.name) return p.name;
  if ((kind ?? id) === "teacher") return "Language teacher";
  if ((kind ?? id) === "interviewer") return "Job interviewer";
  return prettify(id);
}

// Every choice of one option across the personas of a kind: [{id, label}] (roles, languages).
export function optionChoices(name, kind) {
  const seen = new Map();
  for (const p of catalog.personas) {
    if (kind && p.kind !== kind) continue;
    for (const o of p.options ?? []) {
      if (o.name !== name) continue;
      for (const c of choicesOf(o)) if (!seen.has(c.id)) seen.set(c.id, c);
    }
  }
  return [...seen.values()];
}

export function choiceLabel(name, value, kind) {
  const v = text(value);
  if (!v) return "";
  const found = optionChoices(name, kind).find((c) => c.id === v);
  if (found) return found.label;
  return null;
}

export function roleLabel(role) {
  return choiceLabel("role", role) ?? prettify(role);
}

// "German" rather than "German (Deutsch)": the short name, for titles.
export function languageLabel(code, { short = false } = {}) {
  const c = text(code);
  if (!c) return "";
  let label = choiceLabel("language", c);
  if (!label) {
    try {
      label = new Intl.DisplayNames([navigator.language || "en"], { type: "language" }).of(c) || c;
    } catch {
      label = c;
    }
  }
  return short ? label.replace(/\s*\([^)]*\)\s*$/, "") : label;
}

// What a session practised, in words: "Data scientist" or "German · B1".
export function sessionTopic(s) {
  const kind = s.kind ?? personaKind(s.persona);
  if (kind === "teacher") {
    const language = languageLabel(s.language ?? s.options?.language, { short: true });
    return language || "Language practice";
  }
  return text(s.role ?? s.options?.role) ? roleLabel(s.role ?? s.options?.role) : "Interview";
}

export function sessionLevel(s) {
  const kind = s.kind ?? personaKind(s.persona);
  const level = text(s.level ?? s.options?.level);
  if (level) return level;
  if (kind === "interviewer") {
    const difficulty = text(s.options?.difficulty);
    return difficulty ? prettify(difficulty) : "";
  }
  return "";
}

// ---------------------------------------------------------------------------
// Status and scores

const STATUS = {
  completed: { label: "Completed", icon: "✓" },
  interrupted: { label: "Interrupted", icon: "!" },
  active: { label: "In progress", icon: "●" },
};

export function statusBadge(status) {
  const s = STATUS[status] ? status : "unknown";
  const info = STATUS[s] ?? { label: prettify(status) || "Unknown", icon: "?" };
  return h("span", { class: "badge status-badge", dataset: { status: s } },
    h("span", { class: "status-icon", "aria-hidden": "true" }, info.icon), info.label);
}

// Scores are out of 10: green from 8, amber from 5, red below.
export function scoreBand(score) {
  if (score === null) return "none";
  if (score >= 8) return "high";
  if (score >= 5) return "mid";
  return "low";
}

export function clampScore(v) {
  const score = num(v);
  return score === null ? null : Math.min(10, Math.max(0, score));
}

// The badge's own text is just the number; screen readers also hear "Score … out of 10".
export function scoreBadge(value) {
  const score = clampScore(value);
  if (score === null) {
    return h("span", { class: "score-wrap" },
      h("span", { class: "score-badge", dataset: { band: "none" }, title: "Not scored", "aria-hidden": "true" }, "–"),
      srOnly("Not scored"));
  }
  return h("span", { class: "score-wrap" },
    srOnly("Score "),
    h("span", { class: "score-badge", dataset: { band: scoreBand(score) }, title: "Score out of 10" }, formatNumber(score)),
    srOnly(" out of 10"));
}

// ---------------------------------------------------------------------------
// Feedback pieces: the main page's live panel and transcript, and the report page's replay

export function sourceNote(payload) {
  const parts = [];
  if (payload.source === "heuristic") parts.push("Quick automatic check, without a language model.");
  if (text(payload.note)) parts.push(text(payload.note));
  if (!parts.length) return null;
  return h("p", { class: "source-note", dataset: { source: text(payload.source) || "unknown" } }, parts.join(" "));
}

export function bulletSection(title, items, className, heading = "h5") {
  if (!items.length) return null;
  return h("section", { class: `card-section ${className}` },
    h(heading, {}, title),
    h("ul", { class: "bullets" }, items.map((item) => h("li", { dir: "auto" }, item))));
}

export function deliveryChips(d) {
  const chips = [];
  const wpm = num(d.wpm);
  if (wpm !== null) {
    const pace = ["ok", "slow", "fast"].includes(d.pace) ? d.pace : "ok";
    const range = Array.isArray(d.healthy_wpm) && d.healthy_wpm.length === 2 ? d.healthy_wpm.map(num) : null;
    const target = range && range.every((v) => v !== null) ? `a comfortable pace is ${range[0]}–${range[1]} wpm` : "";
    chips.push(h("span", { class: "chip pace", dataset: { pace }, title: target ? `Speaking pace: ${target}` : "Speaking pace" },
      `${Math.round(wpm)} wpm · ${pace === "ok" ? "good pace" : pace}`,
      target && srOnly(` (${target})`)));
  }
  const fillers = d.fillers && typeof d.fillers === "object" ? d.fillers : null;
  const count = num(fillers?.count);
  if (count !== null) {
    const perMinute = num(fillers.per_minute);
    const words = fillers.words && typeof fillers.words === "object"
      ? Object.entries(fillers.words).filter(([, n]) => num(n)).map(([w, n]) => `“${w}” ×${n}`).join(", ")
      : "";
    chips.push(h("span", { class: "chip fillers", dataset: { count: String(count) }, title: words || null },
      count === 0 ? "no fillers" : plural(count, "filler"),
      count > 0 && perMinute !== null ? ` (${formatNumber(perMinute)}/min)` : "",
      words && srOnly(`: ${words}`)));
  }
  const pauses = num(d.long_pauses);
  if (pauses) {
    const longest = num(d.longest_pause_s);
    const detail = longest !== null ? `longest ${formatNumber(longest)} s` : "";
    chips.push(h("span", { class: "chip pauses", title: detail || null },
      plural(pauses, "long pause"), detail && srOnly(` (${detail})`)));
  }
  return chips;
}

// Pace, fillers and pauses of one answer, as chips; `turn` (the main page) goes in data-turn.
export function deliveryLine(d, { turn } = {}) {
  const chips = deliveryChips(d);
  if (!chips.length) return null;
  // Spaces between the chips keep their words apart for screen readers and copy-paste.
  const spaced = chips.flatMap((chip, i) => (i ? [" ", chip] : [chip]));
  return h("p", { class: "delivery", dataset: turn === undefined ? null : { turn } }, srOnly("Delivery: "), spaced);
}

// The agent's response time for one reply: voice to voice (else the stages' times), the stages in
// the tooltip and, since a tooltip is invisible to keyboard and screen-reader users, in words.
// Live turn metrics carry their turn (data-turn); stored ones do not.
export function metricsSpan(m) {
  if (!m || typeof m !== "object") return null;
  const ms = (v) => (num(v) !== null ? `${Math.round(v)} ms` : null);
  const parts = [
    ["speech recognition", ms(m.stt_ms)],
    ["first LLM token", ms(m.llm_ttft_ms)],
    ["first TTS audio", ms(m.tts_ttfb_ms)],
  ].filter(([, v]) => v);
  const headline = ms(m.voice_to_voice_ms);
  if (!headline && !parts.length) return null;
  return h("span", {
    class: "metrics",
    dataset: m.turn === undefined ? null : { turn: String(m.turn) },
    title: [headline && `Voice to voice: ${headline}`, ...parts.map(([k, v]) => `${capitalize(k)}: ${v}`)].filter(Boolean).join("\n"),
  },
  headline ? `voice-to-voice ${headline}` : parts.map(([, v]) => v).join(" / "),
  srOnly(` response time${parts.length ? ` (${parts.map(([k, v]) => `${k} ${v}`).join(", ")})` : ""}`));
}

export function correctionBody(c) {
  const original = text(c.original);
  const corrected = text(c.corrected);
  const explanation = text(c.explanation);
  return [
    h("span", { class: "correction-change" },
      original && h("del", { dir: "auto" }, original),
      original && h("span", { class: "arrow", "aria-hidden": "true" }, " → "),
      original && srOnly(" should be "),
      h("ins", { dir: "auto" }, corrected)),
    explanation && h("span", { class: "explanation", dir: "auto" }, explanation),
  ];
}

export function vocabularyItem(v) {
  return h("div", { class: "vocab-item" }, h("dt", { dir: "auto" }, text(v.word)), h("dd", { dir: "auto" }, text(v.meaning)));
}

function starChecklist(star) {
  if (!star || typeof star !== "object") return null;
  const steps = ["situation", "task", "action", "result"].filter((k) => typeof star[k] === "boolean");
  if (!steps.length) return null;
  return h("section", { class: "card-section star" },
    h("h5", {}, "STAR structure"),
    h("ul", { class: "star-list" }, steps.map((k) =>
      h("li", { dataset: { covered: String(star[k]) } },
        h("span", { class: "star-mark", "aria-hidden": "true" }, star[k] ? "✓" : "✗"),
        capitalize(k),
        srOnly(star[k] ? " covered" : " missing")))));
}

// One answer's feedback card. `label` ("Q2") goes before the question; `withTurn` (the main page)
// adds the answer's turn as data-turn.
export function feedbackCard(f, { label, showAnswer = true, withTurn = false } = {}) {
  const question = text(f.question);
  const better = text(f.better_answer);
  const answer = text(f.answer);
  const dataset = { questionIndex: text(f.question_index), ...(withTurn ? { turn: text(f.turn) } : {}), source: text(f.source) };
  return h("article", { class: "feedback-card", dataset },
    h("header", { class: "card-head" },
      h("h4", { class: "card-question", dir: "auto" },
        label && h("span", { class: "card-label" }, label, srOnly(": ")),
        question || "Your answer"),
      scoreBadge(f.score)),
    bulletSection("What was good", texts(f.good), "good"),
    bulletSection("What was missing", texts(f.missing), "missing"),
    starChecklist(f.star),
    better && h("section", { class: "card-section better" }, h("h5", {}, "A stronger answer"), h("p", { dir: "auto" }, better)),
    showAnswer && answer && h("details", { class: "your-answer" }, h("summary", {}, "Your answer"), h("p", { dir: "auto" }, answer)),
    sourceNote(f));
}

// ---------------------------------------------------------------------------
// The end-of-session report: scorecard (interviews) or summary (language practice)
//
// Options, with the report page's defaults; the main page (its panel and dialog) passes its own:
//   id            the article's id (null: none, for a second copy in a dialog)
//   titleId       the title's id, which labels the article
//   eyebrow       the small line above the title
//   focusTitle    the title can take the focus (tabindex="-1"), for a dialog
//   listHeading   the heading level of the bullet lists (strengths, to improve, suggestions)
//   showPauses    the scorecard's delivery line counts the long pauses
//   showCounts    the summary's section headings give how many corrections and words
//   shortLanguage the summary's title names the language without its own name ("German")

function reportHead(eyebrow, title, titleId, extra, focusTitle = false) {
  return h("header", { class: "report-head" },
    h("div", { class: "report-title" },
      h("p", { class: "eyebrow" }, eyebrow),
      h("h3", { id: titleId, tabIndex: focusTitle ? -1 : null }, title)),
    extra);
}

// The overall score in a ring filled to the score, coloured like the badges.
export function overallRing(overall) {
  const ring = h("p", { class: "overall", dataset: { band: scoreBand(overall) } },
    srOnly("Overall score "),
    h("span", { class: "overall-score" }, overall === null ? "–" : formatNumber(overall, 1)),
    h("span", { class: "out-of" }, overall === null ? "not scored" : "/10"));
  ring.style.setProperty("--pct", `${(overall ?? 0) * 10}%`);
  return ring;
}

export function scorecardCard(sc, {
  id = "scorecard", titleId = "scorecard-title", eyebrow = "Scorecard", title = "Interview scorecard",
  focusTitle = false, listHeading = "h4", showPauses = true,
} = {}) {
  const overall = clampScore(sc.overall_score);
  const questions = Array.isArray(sc.questions) ? sc.questions.filter((q) => q && typeof q === "object") : [];
  const delivery = sc.delivery && typeof sc.delivery === "object" ? sc.delivery : {};
  const wpm = num(delivery.wpm);
  const fpm = num(delivery.fillers_per_minute);
  const pauses = showPauses ? num(delivery.long_pauses) : null;
  const deliveryText = [
    wpm !== null && `${Math.round(wpm)} words per minute`,
    fpm !== null && `${formatNumber(fpm)} fillers per minute`,
    pauses !== null && plural(pauses, "long pause"),
  ].filter(Boolean).join(" · ");

  return h("article", { id, class: "report scorecard", "aria-labelledby": titleId },
    reportHead(eyebrow, title, titleId, overallRing(overall), focusTitle),
    questions.length > 0 && h("section", { class: "report-section" },
      h("h4", {}, "Questions"),
      h("ol", { class: "score-bars" }, questions.map((q, i) => {
        const score = clampScore(q.score);
        const fill = h("span", { class: "bar-fill", dataset: { band: scoreBand(score) } });
        fill.style.width = `${(score ?? 0) * 10}%`;
        return h("li", { class: "score-row" },
          h("span", { class: "q-number", "aria-hidden": "true" }, `Q${i + 1}`),
          h("span", { class: "q-text", dir: "auto", title: text(q.question) || null }, text(q.question) || `Question ${i + 1}`),
          h("span", { class: "bar", "aria-hidden": "true" }, fill),
          h("span", { class: "q-score" }, score === null ? "–" : formatNumber(score), srOnly(score === null ? " not scored" : " out of 10")));
      }))),
    h("div", { class: "report-columns" },
      bulletSection("Strengths", texts(sc.strengths), "good", listHeading),
      bulletSection("To improve", texts(sc.improvements), "missing", listHeading)),
    deliveryText && h("section", { class: "report-section" }, h("h4", {}, "Delivery"), h("p", { class: "delivery-summary" }, deliveryText)),
    sourceNote(sc));
}

export function summaryCard(sm, {
  id = "session-summary", titleId = "summary-title", eyebrow = "Summary",
  focusTitle = false, listHeading = "h4", showCounts = true, shortLanguage = true,
} = {}) {
  const corrections = Array.isArray(sm.corrections) ? sm.corrections.filter((c) => c && text(c.corrected)) : [];
  const vocabulary = Array.isArray(sm.vocabulary) ? sm.vocabulary.filter((v) => v && text(v.word)) : [];
  const language = languageLabel(sm.language, { short: shortLanguage });
  const level = text(sm.level);
  const suggestions = texts(sm.suggestions);
  const counted = (title, n) => (showCounts ? `${title} (${n})` : title);

  return h("article", { id, class: "report summary", "aria-labelledby": titleId },
    reportHead(eyebrow, language ? `${language} session summary` : "Session summary", titleId,
      level && h("p", { class: "level-badge", title: "Your level" }, srOnly("Level "), level), focusTitle),
    corrections.length > 0 && h("section", { class: "report-section" },
      h("h4", {}, counted("Corrections", corrections.length)),
      h("ul", { class: "summary-corrections" }, corrections.map((c) => h("li", { class: "summary-correction" }, correctionBody(c))))),
    vocabulary.length > 0 && h("section", { class: "report-section" },
      h("h4", {}, counted("New words", vocabulary.length)),
      h("dl", { class: "vocabulary-list" }, vocabulary.map(vocabularyItem))),
    bulletSection("Suggestions", suggestions, "suggestions", listHeading),
    !corrections.length && !vocabulary.length && !suggestions.length && h("p", { class: "hint" }, "Nothing to correct this time."),
    sourceNote(sm));
}

// ---------------------------------------------------------------------------
// Charts: Chart.js, coloured from the stylesheet's custom properties, redrawn when the
// colour scheme changes. Each chart lives in its own sized container (Chart.js needs one).

export const HEALTHY_WPM = [120, 160];

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export function alpha(color, a) {
  const hex = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(color);
  if (!hex) return color;
  let v = hex[1];
  if (v.length === 3) v = [...v].map((c) => c + c).join("");
  const n = parseInt(v, 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
}

export function chartTheme() {
  return {
    text: cssVar("--text"),
    muted: cssVar("--muted"),
    border: cssVar("--border"),
    surface: cssVar("--surface"),
    accent: cssVar("--accent"),
    ok: cssVar("--ok"),
    warning: cssVar("--warning"),
    danger: cssVar("--danger"),
    okSoft: cssVar("--ok-soft"),
  };
}

export function bandColor(theme, score) {
  const band = scoreBand(score);
  return band === "high" ? theme.ok : band === "mid" ? theme.warning : band === "low" ? theme.danger : theme.muted;
}

// A plugin (Chart.js's own API) shading a horizontal band, e.g. the healthy speaking pace.
export const bandPlugin = {
  id: "parleyBand",
  beforeDatasetsDraw(chart, _args, opts) {
    if (!opts || opts.from === undefined || opts.to === undefined) return;
    const { ctx, chartArea, scales } = chart;
    const y = scales.y;
    if (!y || !chartArea) return;
    const top = Math.max(chartArea.top, y.getPixelForValue(opts.to));
    const bottom = Math.min(chartArea.bottom, y.getPixelForValue(opts.from));
    if (bottom <= top) return;
    ctx.save();
    ctx.fillStyle = opts.color;
    ctx.fillRect(chartArea.left, top, chartArea.right - chartArea.left, bottom - top);
    if (opts.edge) {
      ctx.strokeStyle = opts.edge;
      ctx.setLineDash([4, 4]);
      ctx.lineWidth = 1;
      for (const yy of [top, bottom]) {
        ctx.beginPath();
        ctx.moveTo(chartArea.left, Math.round(yy) + 0.5);
        ctx.lineTo(chartArea.right, Math.round(yy) + 0.5);
        ctx.stroke();
      }
    }
    ctx.restore();
  },
};

const charts = new Map(); // container → { chart, build }
let themeWatch = null;

function baseOptions(theme) {
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: false, // drawn at once: the page says it is ready right after
    layout: { padding: { top: 6, right: 6 } },
    interaction: { mode: "index", intersect: false },
    plugins: {
      legend: { display: false },
      tooltip: {
        backgroundColor: theme.surface,
        titleColor: theme.text,
        bodyColor: theme.text,
        borderColor: theme.border,
        borderWidth: 1,
        padding: 10,
        displayColors: false,
      },
    },
    scales: {
      x: {
        grid: { display: false },
        border: { color: theme.border },
        ticks: { color: theme.muted, maxRotation: 0, autoSkipPadding: 12 },
      },
      y: {
        grid: { color: alpha(theme.border, 0.7) || theme.border },
        border: { display: false },
        ticks: { color: theme.muted, precision: 0, maxTicksLimit: 6 },
        beginAtZero: true,
      },
    },
  };
}

function merge(target, source) {
  for (const [k, v] of Object.entries(source ?? {})) {
    if (v && typeof v === "object" && !Array.isArray(v) && typeof target[k] === "object" && target[k] && !Array.isArray(target[k])) {
      merge(target[k], v);
    } else {
      target[k] = v;
    }
  }
  return target;
}

// Draws a chart into `container` (emptied first). `build(theme)` returns {type, data, options};
// its options are merged over the shared base.
export function drawChart(container, build) {
  const Chart = window.Chart;
  if (!Chart) throw new Error("The chart library did not load.");
  charts.get(container)?.chart.destroy();
  const theme = chartTheme();
  const config = build(theme);
  const canvas = h("canvas", { "aria-hidden": "true" });
  container.replaceChildren(canvas);
  const options = merge(baseOptions(theme), config.options ?? {});
  const chart = new Chart(canvas, { type: config.type, data: config.data, options, plugins: [bandPlugin, ...(config.plugins ?? [])] });
  charts.set(container, { chart, build });
  watchTheme();
  return chart;
}

function watchTheme() {
  if (themeWatch) return;
  themeWatch = window.matchMedia("(prefers-color-scheme: dark)");
  themeWatch.addEventListener("change", () => {
    for (const [container, { build }] of [...charts]) {
      if (container.isConnected) drawChart(container, build);
      else charts.delete(container);
    }
  });
}

// Line chart dataset styling shared by the pages.
export function lineDataset(theme, label, data, color = theme.accent, extra = {}) {
  return {
    label,
    data,
    borderColor: color,
    backgroundColor: color,
    pointBackgroundColor: theme.surface,
    pointBorderColor: color,
    pointBorderWidth: 2,
    pointRadius: 4,
    pointHoverRadius: 6,
    borderWidth: 2.5,
    cubicInterpolationMode: "monotone", // smooth, without overshooting past the data (below zero)
    spanGaps: true,
    ...extra,
  };
}

// The words an aria-label gives for a series: first, latest, range and which way it went.
// better: "higher" | "lower" | "band" (within [lo, hi]).
export function describeTrend({ what, values, unit = "", better = "higher", band = null, over = "sessions", digits = 1 }) {
  const present = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  if (!present.length) return `${what}: no data yet.`;
  const fmt = (v) => `${Number.isInteger(v) ? v : v.toFixed(digits)}${unit}`;
  const first = present[0];
  const last = present[present.length - 1];
  const parts = [`${what} over ${values.length} ${values.length === 1 ? over.replace(/s$/, "") : over}`];
  if (present.length === 1) {
    parts.push(`${fmt(last)}`);
  } else {
    parts.push(`from ${fmt(first)} to ${fmt(last)}`);
    parts.push(`lowest ${fmt(Math.min(...present))}, highest ${fmt(Math.max(...present))}`);
    const delta = last - first;
    const flat = Math.abs(delta) < Math.max(Math.abs(first) * 0.05, 1e-9);
    if (better === "band" && band) {
      // judged by where the latest value sits
    } else if (flat) {
      parts.push("about the same");
    } else {
      const up = delta > 0;
      const good = better === "higher" ? up : !up;
      parts.push(`${up ? "up" : "down"}, ${good ? "an improvement" : "getting worse"}`);
    }
  }
  if (band) {
    const [lo, hi] = band;
    const where = last < lo ? `below the healthy ${lo}–${hi}${unit} range` : last > hi ? `above the healthy ${lo}–${hi}${unit} range` : `within the healthy ${lo}–${hi}${unit} range`;
    parts.push(`latest ${where}`);
  }
  return `${parts.join("; ")}.`;
}

// The page is drawn: tests wait for this.
export function markReady() {
  // Charts are drawn synchronously (no animation), so the page is complete now.
  document.body.dataset.ready = "yes";
}

export function markBusy() {
  delete document.body.dataset.ready;
}
