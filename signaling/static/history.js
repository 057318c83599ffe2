// History: the person's past sessions (newest first, paged, filtered) and, above them, their
// progress for one persona + role (or language): charts over sessions, statements, questions.

import {
  $, ApiError, alpha, api, bandColor, capitalize, clampScore, describeTrend, drawChart, formatDate, formatDateTime,
  formatNumber, formatTime, h, HEALTHY_WPM, isoDateTimeAttr, languageLabel, lineDataset, loadCatalog, markBusy,
  markReady, num, optionChoices, personaKind, personaName, personas, roleLabel, scoreBadge, sessionLevel, sessionTopic,
  srOnly, statusBadge, text,
} from "./common.js";

const PAGE_SIZE = 20;

const els = {
  error: $("error"),
  errorText: $("error-text"),
  retry: $("retry"),
  historyEmpty: $("history-empty"),
  newSession: $("new-session-link"),
  filters: $("filters"),
  filterForm: $("filter-form"),
  persona: $("filter-persona"),
  topicField: $("filter-topic-field"),
  topicLabel: $("filter-topic-label"),
  topic: $("filter-topic"),
  status: $("filter-status"),
  clear: $("clear-filters"),
  progress: $("progress"),
  progressSubject: $("progress-subject"),
  progressEmpty: $("progress-empty"),
  progressBody: $("progress-body"),
  statements: $("statements"),
  questionsSection: $("questions-section"),
  questionsBody: $("questions-body"),
  sessions: $("sessions"),
  sessionsCount: $("sessions-count"),
  sessionsEmpty: $("sessions-empty"),
  sessionsEmptyClear: $("sessions-empty-clear"),
  sessionsTable: $("sessions-table"),
  sessionsBody: $("sessions-body"),
  pager: $("pager"),
  prev: $("prev-page"),
  next: $("next-page"),
  pageInfo: $("page-info"),
};

// Filters and page, mirrored in the address bar so Back and reload keep them.
const state = { persona: "", topic: "", status: "", offset: 0 };
let progressKey = null; // what the progress section currently shows
let loadSeq = 0;
let controller = null;

// Hooks for tests and the console.
const parleyHistory = { list: null, progress: null };
window.parleyHistory = parleyHistory;

// ---------------------------------------------------------------------------
// State ⇄ URL

function readUrl() {
  const q = new URL(location.href).searchParams;
  state.persona = q.get("persona") ?? "";
  state.topic = q.get("role") ?? q.get("language") ?? "";
  state.status = q.get("status") ?? "";
  const offset = Number.parseInt(q.get("offset") ?? "0", 10);
  state.offset = Number.isFinite(offset) && offset > 0 ? offset : 0;
}

function topicParam(persona) {
  return personaKind(persona) === "teacher" ? "language" : "role";
}

function writeUrl(push) {
  const url = new URL(location.href);
  url.search = "";
  if (state.persona) url.searchParams.set("persona", state.persona);
  if (state.persona && state.topic) url.searchParams.set(topicParam(state.persona), state.topic);
  if (state.status) url.searchParams.set("status", state.status);
  if (state.offset) url.searchParams.set("offset", String(state.offset));
  if (url.href === location.href) return;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function hasFilters() {
  return Boolean(state.persona || state.topic || state.status);
}

// ---------------------------------------------------------------------------
// Filter controls

function fillPersonaSelect() {
  const options = [new Option("All practice", "")];
  const list = personas();
  for (const p of list) options.push(new Option(p.name || p.id, p.id));
  // A persona in the URL that the catalog does not know (retired): keep it selectable.
  if (state.persona && !list.some((p) => p.id === state.persona)) options.push(new Option(personaName(state.persona), state.persona));
  els.persona.replaceChildren(...options);
  els.persona.value = state.persona;
}

function fillTopicSelect() {
  const kind = personaKind(state.persona);
  const teacher = kind === "teacher";
  els.topicLabel.textContent = teacher ? "Language" : kind === "interviewer" ? "Role" : "Role or language";
  if (!state.persona) {
    els.topic.replaceChildren(new Option("Pick a practice first", ""));
    els.topic.disabled = true;
    return;
  }
  const choices = optionChoices(teacher ? "language" : "role", kind);
  const options = [new Option(teacher ? "All languages" : "All roles", ""), ...choices.map((c) => new Option(c.label, c.id))];
  if (state.topic && !choices.some((c) => c.id === state.topic)) {
    options.push(new Option(teacher ? languageLabel(state.topic) : roleLabel(state.topic), state.topic));
  }
  els.topic.replaceChildren(...options);
  els.topic.disabled = false;
  els.topic.value = state.topic;
}

function syncControls() {
  fillPersonaSelect();
  fillTopicSelect();
  els.status.value = state.status;
  els.clear.hidden = !hasFilters();
}

// ---------------------------------------------------------------------------
// Errors

function showError(err) {
  els.errorText.textContent = err instanceof ApiError || err?.message ? err.message : String(err);
  els.error.hidden = false;
}

function clearError() {
  els.error.hidden = true;
  els.errorText.textContent = "";
}

// ---------------------------------------------------------------------------
// Sessions table

// Empty filters are left out rather than sent blank (the server validates what it gets).
function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== "" && value !== null && value !== undefined) q.set(key, value);
  return q;
}

function listQuery(extra = {}) {
  const q = query({
    limit: String(PAGE_SIZE),
    offset: String(state.offset),
    persona: state.persona,
    role: state.persona && topicParam(state.persona) === "role" ? state.topic : "",
    language: state.persona && topicParam(state.persona) === "language" ? state.topic : "",
    status: state.status,
    ...extra,
  });
  return `/api/sessions?${q}`;
}

function reportUrl(id) {
  return `/sessions/${encodeURIComponent(id)}`;
}

function sessionRow(s) {
  const kind = s.kind ?? personaKind(s.persona);
  const topic = sessionTopic(s);
  const level = sessionLevel(s);
  const persona = kind === "teacher" ? "Language practice" : kind === "interviewer" ? "Job interview" : personaName(s.persona);
  const turns = num(s.turns);
  const link = h("a", { class: "row-link", href: reportUrl(s.id) }, topic, srOnly(`, ${persona.toLowerCase()}, ${formatDateTime(s.started_at)}`));
  const row = h("tr", { class: "session-row", dataset: { id: text(s.id), status: text(s.status), kind: text(kind) } },
    h("td", { class: "cell-date", dataset: { label: "Date" } },
      h("time", { datetime: isoDateTimeAttr(s.started_at) }, formatDate(s.started_at)),
      h("span", { class: "cell-sub" }, formatTime(s.started_at))),
    h("td", { class: "cell-practice", dataset: { label: "Practice" } },
      link,
      h("span", { class: "cell-sub" }, persona, level && h("span", { class: "level-chip" }, srOnly("level "), level))),
    h("td", { class: "cell-status", dataset: { label: "Status" } }, statusBadge(s.status)),
    h("td", { class: "num cell-turns", dataset: { label: "Turns" } }, turns === null ? "–" : String(turns)),
    h("td", { class: "num cell-score", dataset: { label: "Score" } },
      kind === "teacher" && num(s.overall_score) === null
        ? h("span", { class: "muted", title: "Language sessions are not scored" }, "–", srOnly("Not scored"))
        : scoreBadge(s.overall_score)));
  return row;
}

function renderSessions(list) {
  const items = Array.isArray(list.items) ? list.items : [];
  const total = num(list.total) ?? items.length;
  const offset = num(list.offset) ?? state.offset;
  els.sessionsBody.replaceChildren(...items.map(sessionRow));
  const none = items.length === 0;
  els.sessionsTable.hidden = none;
  els.sessionsEmpty.hidden = !none;
  els.pager.hidden = total <= PAGE_SIZE && offset === 0;
  els.prev.disabled = offset <= 0;
  els.next.disabled = offset + items.length >= total;
  els.pageInfo.textContent = none ? "" : `${offset + 1}–${offset + items.length} of ${total}`;
  els.sessionsCount.textContent = none ? "" : `${total} ${total === 1 ? "session" : "sessions"}${hasFilters() ? " match" : ""}`;
}

// ---------------------------------------------------------------------------
// Progress

// The persona and role/language to chart: the filter's, else those of the latest session.
async function progressTarget(list, signal) {
  let persona = state.persona;
  let topic = state.topic;
  if (persona && topic) return { persona, topic };
  let latest = state.offset === 0 && !state.status ? list.items?.[0] : null;
  if (!latest) {
    const first = await api(listQuery({ limit: "1", offset: "0", status: "" }), { signal });
    latest = first.items?.[0];
  }
  if (!latest) return null;
  persona ||= latest.persona;
  const kind = latest.kind ?? personaKind(persona);
  topic ||= text(kind === "teacher" ? latest.language ?? latest.options?.language : latest.role ?? latest.options?.role);
  return { persona, topic, kind, fromLatest: true };
}

function progressQuery(target) {
  const q = query({ persona: target.persona, [topicParam(target.persona)]: target.topic });
  return `/api/progress?${q}`;
}

// "Data scientist interviews", "German conversations", "job interviews"…
function subjectWords(target) {
  const kind = target.kind ?? personaKind(target.persona);
  if (kind === "teacher") {
    const language = languageLabel(target.topic, { short: true });
    return language ? `${language} conversations` : "language practice sessions";
  }
  return target.topic ? `${roleLabel(target.topic)} interviews` : "job interviews";
}

function renderSubject(target, count) {
  els.progressSubject.replaceChildren(
    h("strong", {}, capitalize(subjectWords(target))),
    count ? ` · ${count} ${count === 1 ? "session" : "sessions"}` : "",
    target.fromLatest ? h("span", { class: "subject-note" }, " — your most recent practice. Choose a practice and role or language above to see another.") : "");
}

function sessionLabel(s) {
  return formatDate(s.started_at, { year: false }) || `#${s.index + 1}`;
}

// The point right under the pointer (the tooltip shows the nearest column; a click must hit a point).
function pointAt(chart, event) {
  return chart.getElementsAtEventForMode(event.native ?? event, "nearest", { intersect: true }, false)[0] ?? null;
}

function pointCursor(event, _elements, chart) {
  const canvas = event.native?.target;
  if (canvas) canvas.style.cursor = pointAt(chart, event) ? "pointer" : "default";
}

// A line chart over sessions. Clicking a point opens that session's report.
function sessionLineChart(container, sessions, { label, values, color, unit, yOptions = {}, band = null, pointColors = null, format }) {
  drawChart(container, (theme) => {
    const stroke = color(theme);
    const dataset = lineDataset(theme, label, values, stroke, pointColors ? { pointBorderColor: values.map((v) => pointColors(theme, v)) } : {});
    return {
      type: "line",
      data: { labels: sessions.map(sessionLabel), datasets: [dataset] },
      options: {
        onClick: (event, _elements, chart) => {
          const s = sessions[pointAt(chart, event)?.index];
          if (s?.session) location.href = reportUrl(s.session);
        },
        onHover: pointCursor,
        plugins: {
          parleyBand: band ? { from: band[0], to: band[1], color: alpha(theme.ok, 0.14), edge: alpha(theme.ok, 0.55) } : {},
          tooltip: {
            callbacks: {
              title: (items) => formatDateTime(sessions[items[0].dataIndex]?.started_at),
              label: (item) => (item.raw === null ? `${label}: no data` : `${label}: ${format(item.raw)}${unit ? ` ${unit}` : ""}`),
              footer: () => "Click the point to open the report",
            },
            footerColor: theme.muted,
            footerFont: { weight: "normal", size: 11 },
          },
        },
        scales: { y: yOptions },
      },
    };
  });
}

// A note over a chart with nothing to plot (the axes stay, faded).
function chartEmpty(id, values, message) {
  const note = $(`${id}-empty`);
  const empty = !values.some((v) => v !== null);
  note.hidden = !empty;
  note.textContent = empty ? message : "";
}

function renderCharts(target, sessions) {
  const kind = target.kind ?? personaKind(target.persona);
  const n = (key) => sessions.map((s) => num(s[key]));
  const scores = n("score").map(clampScore);
  const wpm = n("wpm");
  const fillers = n("fillers_per_minute");
  const latency = n("latency_ms");
  const corrections = n("corrections");

  // Language sessions are not scored: the first chart shows corrections per session instead.
  const scoreBox = $("chart-score");
  const useCorrections = kind === "teacher" && scores.every((v) => v === null);
  scoreBox.dataset.metric = useCorrections ? "corrections" : "score";
  $("chart-score-title").textContent = useCorrections ? "Corrections" : "Score";
  $("chart-score-note").textContent = useCorrections
    ? "Corrections per session. Fewer is better."
    : "Average per session, out of 10. Higher is better.";

  if (useCorrections) {
    sessionLineChart(scoreBox, sessions, {
      label: "Corrections", values: corrections, unit: "", format: (v) => formatNumber(v),
      color: (t) => t.warning, yOptions: { suggestedMax: 5 },
    });
    scoreBox.setAttribute("aria-label", describeTrend({ what: "Corrections per session", values: corrections, better: "lower" }));
  } else {
    sessionLineChart(scoreBox, sessions, {
      label: "Score", values: scores, unit: "/ 10", format: (v) => formatNumber(v),
      color: (t) => t.accent, pointColors: (t, v) => (v === null ? t.muted : bandColor(t, v)),
      yOptions: { min: 0, max: 10, ticks: { stepSize: 2 } },
    });
    scoreBox.setAttribute("aria-label", describeTrend({ what: "Average score out of 10", values: scores, better: "higher" }));
  }

  const paceBox = $("chart-pace");
  sessionLineChart(paceBox, sessions, {
    label: "Pace", values: wpm, unit: "wpm", format: (v) => String(Math.round(v)),
    color: (t) => t.accent, band: HEALTHY_WPM,
    pointColors: (t, v) => (v === null ? t.muted : v >= HEALTHY_WPM[0] && v <= HEALTHY_WPM[1] ? t.ok : t.warning),
    yOptions: { beginAtZero: false, suggestedMin: 90, suggestedMax: 190 },
  });
  paceBox.setAttribute("aria-label", describeTrend({ what: "Speaking pace", values: wpm, unit: " wpm", better: "band", band: HEALTHY_WPM, digits: 0 }));

  const fillerBox = $("chart-fillers");
  sessionLineChart(fillerBox, sessions, {
    label: "Fillers", values: fillers, unit: "per minute", format: (v) => formatNumber(v),
    color: (t) => t.warning, yOptions: { suggestedMax: 4, ticks: { precision: 1 } },
  });
  fillerBox.setAttribute("aria-label", describeTrend({ what: "Filler words per minute", values: fillers, better: "lower" }));

  const latencyBox = $("chart-latency");
  sessionLineChart(latencyBox, sessions, {
    label: "Voice to voice", values: latency, unit: "ms", format: (v) => String(Math.round(v)),
    color: (t) => t.muted, yOptions: { suggestedMax: 1500 },
  });
  latencyBox.setAttribute("aria-label", describeTrend({ what: "Voice-to-voice latency", values: latency, unit: " ms", better: "lower", digits: 0 }));

  const spoken = kind === "teacher" ? "Not measured in these language sessions." : "No spoken answers measured yet.";
  chartEmpty("chart-score", useCorrections ? corrections : scores, useCorrections ? "No corrections recorded yet." : "No scored answers yet.");
  chartEmpty("chart-pace", wpm, spoken);
  chartEmpty("chart-fillers", fillers, spoken);
  chartEmpty("chart-latency", latency, "No response times recorded yet.");
}

const CHANGE = {
  improved: { icon: "↑", label: "Improved" },
  worse: { icon: "↓", label: "Worse" },
  same: { icon: "→", label: "Same" },
};

function questionRow(q) {
  const change = CHANGE[q.change] ? q.change : "same";
  const info = CHANGE[change];
  return h("tr", { dataset: { change } },
    h("th", { scope: "row", class: "cell-question", dir: "auto" }, text(q.question) || "Question"),
    h("td", { class: "num", dataset: { label: "Before" } }, scoreBadge(q.previous)),
    h("td", { class: "num", dataset: { label: "Latest" } }, scoreBadge(q.latest)),
    h("td", {}, h("span", { class: "change-badge", dataset: { change } }, h("span", { "aria-hidden": "true" }, info.icon), ` ${info.label}`)),
    h("td", { class: "cell-open" }, q.session ? h("a", { href: reportUrl(q.session) }, "Open", srOnly(" the latest answer's report")) : ""));
}

function renderProgress(target, progress) {
  const sessions = (Array.isArray(progress?.sessions) ? progress.sessions : []).map((s, index) => ({ ...s, index }));
  const statements = Array.isArray(progress?.statements) ? progress.statements.map(text).filter(Boolean) : [];
  const questions = Array.isArray(progress?.questions) ? progress.questions.filter((q) => q && typeof q === "object") : [];

  renderSubject(target, sessions.length);

  if (!sessions.length) {
    els.progressBody.hidden = true;
    els.progressEmpty.hidden = false;
    els.progressEmpty.replaceChildren(`No ${subjectWords(target)} yet. `, h("a", { href: "/" }, "Start one"), " to see your progress here.");
    return;
  }
  els.progressEmpty.hidden = true;
  els.progressBody.hidden = false;

  els.statements.replaceChildren(...statements.map((s) => h("li", { dir: "auto" }, s)));
  els.statements.hidden = !statements.length;

  renderCharts(target, sessions);

  els.questionsBody.replaceChildren(...questions.map(questionRow));
  els.questionsSection.hidden = !questions.length;
}

function clearProgress(message) {
  els.progressBody.hidden = true;
  els.progressSubject.textContent = "";
  els.progressEmpty.hidden = false;
  els.progressEmpty.textContent = message;
}

// ---------------------------------------------------------------------------
// Loading

async function load() {
  const seq = ++loadSeq;
  controller?.abort();
  controller = new AbortController();
  const { signal } = controller;
  markBusy();
  clearError();
  els.sessions.setAttribute("aria-busy", "true");
  try {
    const list = await api(listQuery(), { signal });
    if (seq !== loadSeq) return;
    parleyHistory.list = list;

    // A page past the end (sessions deleted, a stale link): back to the last real page.
    if (!list.items?.length && state.offset > 0 && num(list.total) > 0) {
      state.offset = Math.max(0, Math.floor((list.total - 1) / PAGE_SIZE) * PAGE_SIZE);
      writeUrl(false);
      return load();
    }

    const nothingAtAll = !hasFilters() && num(list.total) === 0 && state.offset === 0;
    els.historyEmpty.hidden = !nothingAtAll;
    els.filters.hidden = nothingAtAll;
    els.progress.hidden = nothingAtAll;
    els.sessions.hidden = nothingAtAll;
    els.newSession.hidden = nothingAtAll; // the empty state has its own, bigger button
    if (nothingAtAll) {
      progressKey = null;
      markReady();
      return;
    }
    renderSessions(list);
    els.sessions.setAttribute("aria-busy", "false");

    const target = await progressTarget(list, signal);
    if (seq !== loadSeq) return;
    if (!target) {
      progressKey = null;
      clearProgress("No sessions to chart yet.");
    } else {
      const key = progressQuery(target);
      if (key !== progressKey) {
        els.progress.setAttribute("aria-busy", "true");
        const progress = await api(key, { signal });
        if (seq !== loadSeq) return;
        parleyHistory.progress = progress;
        renderProgress(target, progress);
        progressKey = key;
      } else {
        // Same data; only whether it was picked from the filter or the latest session changed.
        renderSubject(target, parleyHistory.progress?.sessions?.length ?? 0);
      }
    }
    els.progress.setAttribute("aria-busy", "false");
    markReady();
  } catch (err) {
    if (err?.name === "AbortError" || seq !== loadSeq) return;
    showError(new Error(`Could not load your history: ${err?.message || err}`));
    els.sessionsBody.replaceChildren();
    if (!progressKey) els.progress.hidden = true;
    els.sessions.setAttribute("aria-busy", "false");
    els.progress.setAttribute("aria-busy", "false");
    // Still "rendered": tests and people both see the error.
    markReady();
  }
}

function applyFilters({ push = true } = {}) {
  state.offset = 0;
  syncControls();
  writeUrl(push);
  load();
}

function goToPage(offset) {
  state.offset = Math.max(0, offset);
  writeUrl(true);
  load().then(() => els.sessions.scrollIntoView({ block: "start", behavior: "smooth" }));
}

function clearFilters() {
  state.persona = "";
  state.topic = "";
  state.status = "";
  applyFilters();
  els.persona.focus();
}

async function init() {
  readUrl();
  els.persona.addEventListener("change", () => {
    state.persona = els.persona.value;
    state.topic = "";
    applyFilters();
  });
  els.topic.addEventListener("change", () => {
    state.topic = els.topic.value;
    applyFilters();
  });
  els.status.addEventListener("change", () => {
    state.status = els.status.value;
    applyFilters();
  });
  els.filterForm.addEventListener("submit", (event) => event.preventDefault());
  els.clear.addEventListener("click", clearFilters);
  els.sessionsEmptyClear.addEventListener("click", clearFilters);
  els.prev.addEventListener("click", () => goToPage(state.offset - PAGE_SIZE));
  els.next.addEventListener("click", () => goToPage(state.offset + PAGE_SIZE));
  els.retry.addEventListener("click", () => load());
  // The whole row opens the report; the link inside it is what keyboards and screen readers use.
  els.sessionsBody.addEventListener("click", (event) => {
    if (event.target.closest("a, button") || String(getSelection())) return;
    const link = event.target.closest("tr")?.querySelector("a.row-link");
    if (!link) return;
    if (event.ctrlKey || event.metaKey) window.open(link.href, "_blank", "noopener");
    else link.click();
  });
  window.addEventListener("popstate", () => {
    readUrl();
    syncControls();
    load();
  });

  await loadCatalog();
  syncControls();
  await load();
}

init();
