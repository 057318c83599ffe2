// One session's report: header, scorecard or summary, per-answer charts, and the transcript
// replayed with delivery chips, corrections and feedback cards next to the answers.

import {
  $, ApiError, alpha, api, bandColor, clampScore, correctionBody, deliveryLine, describeTrend, download, drawChart,
  durationSeconds, feedbackCard, formatDateTime, formatDuration, formatNumber, formatOffset, h, HEALTHY_WPM,
  isoDateTimeAttr, languageLabel, loadCatalog, markReady, metricsSpan, num, personaKind, personaName, prettify, roleLabel,
  scorecardCard, sessionLevel, sessionTopic, srOnly, statusBadge, summaryCard, text, vocabularyItem,
} from "./common.js";

const els = {
  error: $("error"),
  errorText: $("error-text"),
  retry: $("retry"),
  notFound: $("not-found"),
  notFoundText: $("not-found-text"),
  loading: $("loading"),
  content: $("report-content"),
  kind: $("session-kind"),
  title: $("session-title"),
  meta: $("session-meta"),
  status: $("session-status"),
  interruptedNote: $("interrupted-note"),
  exportStatus: $("export-status"),
  resultSlot: $("result-slot"),
  replayList: $("replay-list"),
  replayCount: $("replay-count"),
  replayEmpty: $("replay-empty"),
  extra: $("extra-feedback"),
  extraList: $("extra-feedback-list"),
};

const parleyReport = { session: null, anchors: null };
window.parleyReport = parleyReport;

function sessionId() {
  const match = /\/sessions\/([^/]+)\/?$/.exec(location.pathname);
  if (match) {
    try {
      return decodeURIComponent(match[1]);
    } catch {
      return match[1];
    }
  }
  // report.html opened directly (development): ?id=…
  return new URL(location.href).searchParams.get("id") ?? "";
}

const SESSION_ID = sessionId();
const apiPath = (suffix = "") => `/api/sessions/${encodeURIComponent(SESSION_ID)}${suffix}`;

// ---------------------------------------------------------------------------
// Matching evaluations to the answers they are about

const wordCount = (s) => (text(s).match(/[\p{L}\p{N}][\p{L}\p{N}'’-]*/gu) ?? []).length;
const norm = (s) => text(s).toLocaleLowerCase().replace(/[^\p{L}\p{N}]+/gu, " ").trim();

// Deliveries come one per spoken utterance, in order, tagged with the question being answered;
// feedback comes one per question (its answer being all the utterances for it); corrections quote
// the words they fix. Returns per-turn annotations (by seq) and what could not be placed.
function anchorEvaluations(transcript, evaluations) {
  const users = transcript.filter((t) => t.speaker === "user");
  const agents = transcript.filter((t) => t.speaker === "agent");
  const bySeq = new Map();
  const extra = { feedback: [], corrections: [] };
  const slot = (turn) => {
    if (!bySeq.has(turn.seq)) bySeq.set(turn.seq, { deliveries: [], feedback: [], corrections: [], questionIndex: null });
    return bySeq.get(turn.seq);
  };
  const ofKind = (kind) => evaluations.filter((e) => e?.kind === kind);

  // Delivery: the next user turn, or one a little further on whose word count matches exactly
  // (a turn the analysis skipped, e.g. said after the closing question).
  let next = 0;
  for (const d of ofKind("delivery")) {
    if (next >= users.length) break;
    let k = next;
    const words = num(d.words);
    if (words !== null && wordCount(users[next].text) !== words) {
      for (let i = next + 1; i < Math.min(users.length, next + 4); i++) {
        if (wordCount(users[i].text) === words) {
          k = i;
          break;
        }
      }
    }
    const s = slot(users[k]);
    s.deliveries.push(d);
    if (num(d.question_index) !== null) s.questionIndex = d.question_index;
    next = k + 1;
  }

  // Feedback: after the last utterance of its question; else the turn its answer quotes; else the
  // first answer after the agent asked its question.
  for (const f of ofKind("feedback")) {
    const qi = num(f.question_index);
    let turn = null;
    if (qi !== null) turn = users.findLast((u) => bySeq.get(u.seq)?.questionIndex === qi) ?? null;
    const answer = norm(f.answer);
    if (!turn && answer) {
      turn = users.findLast((u) => {
        const t = norm(u.text);
        return t && (t === answer || (t.length >= 12 && answer.includes(t)));
      }) ?? null;
    }
    const question = norm(f.question);
    if (!turn && question) {
      const asked = agents.find((a) => norm(a.text).includes(question));
      if (asked) turn = users.find((u) => u.seq > asked.seq) ?? null;
    }
    if (turn) {
      const s = slot(turn);
      s.feedback.push(f);
      if (s.questionIndex === null && qi !== null) s.questionIndex = qi;
    } else {
      extra.feedback.push(f);
    }
  }

  // Corrections: the turn containing the words they correct, searching on from the previous one.
  let from = 0;
  for (const c of ofKind("correction")) {
    if (!text(c.corrected)) continue;
    const original = norm(c.original);
    let idx = -1;
    if (original) {
      idx = users.findIndex((u, i) => i >= from && norm(u.text).includes(original));
      if (idx < 0) idx = users.findIndex((u) => norm(u.text).includes(original));
    }
    if (idx >= 0) {
      slot(users[idx]).corrections.push(c);
      from = idx;
    } else {
      extra.corrections.push(c);
    }
  }
  return { bySeq, extra, users };
}

// ---------------------------------------------------------------------------
// Header

function metaItem(term, ...value) {
  return h("div", { class: "meta-item" }, h("dt", {}, term), h("dd", {}, ...value));
}

function sessionDuration(s) {
  let seconds = durationSeconds(s.started_at, s.ended_at);
  if (seconds === null) {
    const last = (s.transcript ?? []).findLast((t) => t.at);
    seconds = last ? durationSeconds(s.started_at, last.at) : null;
  }
  return seconds;
}

function renderHeader(s, kind) {
  const topic = sessionTopic(s);
  const title = kind === "teacher" ? `${topic} conversation` : `${topic} interview`;
  els.kind.textContent = personaName(s.persona, kind);
  els.title.textContent = title;
  document.title = `${title} · Parley`;

  const o = s.options && typeof s.options === "object" ? s.options : {};
  const level = sessionLevel(s);
  const seconds = sessionDuration(s);
  const turns = num(s.turns) ?? (Array.isArray(s.transcript) ? s.transcript.length : null);
  const items = [];
  if (kind === "teacher") {
    items.push(metaItem("Language", languageLabel(s.language ?? o.language) || "–"));
    if (level) items.push(metaItem("Level", h("span", { class: "level-chip" }, level)));
    if (text(o.native_language)) items.push(metaItem("Explained in", languageLabel(o.native_language, { short: true })));
  } else {
    items.push(metaItem("Role", text(s.role ?? o.role) ? roleLabel(s.role ?? o.role) : "–"));
    if (text(o.interview_type)) items.push(metaItem("Type", prettify(o.interview_type)));
    if (level) items.push(metaItem(text(s.level) ? "Level" : "Difficulty", h("span", { class: "level-chip" }, level)));
  }
  items.push(metaItem("Date", h("time", { datetime: isoDateTimeAttr(s.started_at) }, formatDateTime(s.started_at) || "–")));
  items.push(metaItem("Duration", s.status === "active" && !s.ended_at ? "in progress" : formatDuration(seconds) || "–"));
  if (turns !== null) items.push(metaItem("Turns", String(turns)));
  els.meta.replaceChildren(...items);
  els.status.replaceChildren(srOnly("Status: "), statusBadge(s.status));

  const notes = {
    interrupted: "This session was interrupted before it finished (the connection dropped or the page was closed). " +
      "Everything said and evaluated until then is below.",
    active: "This session has not ended yet. The final scorecard appears here once it does.",
  };
  els.interruptedNote.hidden = !notes[s.status];
  els.interruptedNote.dataset.status = text(s.status);
  els.interruptedNote.replaceChildren(
    h("strong", {}, s.status === "interrupted" ? "Interrupted. " : "In progress. "),
    notes[s.status] ?? "");
}

// ---------------------------------------------------------------------------
// Scorecard or summary (or what can be put together without one)

function resultKind(result, kind) {
  if (!result || typeof result !== "object") return null;
  if ("overall_score" in result || Array.isArray(result.questions)) return "scorecard";
  if (Array.isArray(result.corrections) || Array.isArray(result.vocabulary) || Array.isArray(result.suggestions)) return "summary";
  return kind === "teacher" ? "summary" : "scorecard";
}

function feedbackByQuestion(evaluations) {
  return evaluations
    .filter((e) => e?.kind === "feedback")
    .slice()
    .sort((a, b) => (num(a.question_index) ?? 1e9) - (num(b.question_index) ?? 1e9));
}

function aggregateDelivery(deliveries) {
  let words = 0;
  let speech = 0;
  let fillers = 0;
  let pauses = 0;
  for (const d of deliveries) {
    words += num(d.words) ?? 0;
    speech += num(d.speech_s) ?? 0;
    fillers += num(d.fillers?.count) ?? 0;
    pauses += num(d.long_pauses) ?? 0;
  }
  if (speech <= 0) return {};
  return { wpm: (words / speech) * 60, fillers_per_minute: fillers / (speech / 60), long_pauses: pauses };
}

function renderResult(s, kind) {
  const evaluations = Array.isArray(s.evaluations) ? s.evaluations : [];
  const result = s.result && typeof s.result === "object" ? s.result : null;
  const rk = resultKind(result, kind);
  let card;
  if (rk === "scorecard") {
    card = scorecardCard(result, { titleId: "result-card-title", eyebrow: "Scorecard", title: "Interview scorecard" });
  } else if (rk === "summary") {
    card = summaryCard({ language: s.language, level: s.level, ...result }, { titleId: "result-card-title", eyebrow: "Summary" });
  } else {
    // No final report (interrupted, still running): built from what was evaluated on the way.
    const partialNote = "No final report: the session ended before it was complete. This is put together from what was evaluated along the way.";
    if (kind === "teacher") {
      const corrections = evaluations.filter((e) => e?.kind === "correction" && text(e.corrected));
      const vocabulary = evaluations.filter((e) => e?.kind === "vocabulary" && text(e.word));
      card = summaryCard({ language: s.language ?? s.options?.language, level: s.level ?? s.options?.level, corrections, vocabulary, suggestions: [], note: partialNote },
        { titleId: "result-card-title", eyebrow: "Partial summary" });
    } else {
      const feedback = feedbackByQuestion(evaluations);
      if (feedback.length) {
        const scores = feedback.map((f) => clampScore(f.score)).filter((v) => v !== null);
        card = scorecardCard({
          overall_score: scores.length ? scores.reduce((a, b) => a + b, 0) / scores.length : null,
          questions: feedback.map((f) => ({ question: f.question, score: f.score })),
          delivery: aggregateDelivery(evaluations.filter((e) => e?.kind === "delivery")),
          note: partialNote,
        }, { titleId: "result-card-title", eyebrow: "Partial scorecard", title: "Interview scorecard" });
      } else {
        card = h("article", { class: "report report-none", "aria-labelledby": "result-card-title" },
          h("header", { class: "report-head" }, h("div", { class: "report-title" },
            h("p", { class: "eyebrow" }, "Scorecard"),
            h("h3", { id: "result-card-title" }, "No scorecard for this session"))),
          h("p", { class: "hint report-section" }, "No answer was evaluated before the session ended. Finish a session with End session to get a full scorecard."));
      }
    }
  }
  els.resultSlot.replaceChildren(card);
  return rk;
}

// ---------------------------------------------------------------------------
// Charts

function shorten(s, n = 60) {
  const t = text(s);
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

function chartEmpty(id, message) {
  const note = $(`${id}-empty`);
  note.hidden = !message;
  note.textContent = message ?? "";
}

// Scores per question: from the scorecard, else from the feedback of each answer.
function answerScores(s) {
  const result = s.result && typeof s.result === "object" ? s.result : null;
  if (Array.isArray(result?.questions) && result.questions.length) {
    return result.questions.map((q, i) => ({ label: `Q${i + 1}`, question: text(q?.question), score: clampScore(q?.score), index: i }));
  }
  return feedbackByQuestion(s.evaluations ?? []).map((f, i) => {
    const qi = num(f.question_index) ?? i;
    return { label: `Q${qi + 1}`, question: text(f.question), score: clampScore(f.score), index: qi };
  });
}

// Pace per answer: the deliveries of each question pooled (words over speaking time); without
// deliveries, each spoken user turn's words over its speech time.
function answerPaces(s, anchors) {
  const deliveries = (s.evaluations ?? []).filter((e) => e?.kind === "delivery");
  if (deliveries.length) {
    const groups = new Map();
    deliveries.forEach((d, i) => {
      const qi = num(d.question_index);
      const key = qi === null ? `a${i}` : `q${qi}`;
      if (!groups.has(key)) groups.set(key, { label: qi === null ? `A${groups.size + 1}` : `Q${qi + 1}`, words: 0, speech: 0, wpms: [], n: 0 });
      const g = groups.get(key);
      g.words += num(d.words) ?? 0;
      g.speech += num(d.speech_s) ?? 0;
      if (num(d.wpm) !== null) g.wpms.push(d.wpm);
      g.n += 1;
    });
    return [...groups.values()].map((g) => ({
      label: g.label,
      wpm: g.speech > 0 ? (g.words / g.speech) * 60 : g.wpms.length ? g.wpms.reduce((a, b) => a + b, 0) / g.wpms.length : null,
      detail: `${g.n} ${g.n === 1 ? "utterance" : "utterances"}, ${g.words} words`,
    }));
  }
  return anchors.users
    .map((u, i) => ({ u, i }))
    .filter(({ u }) => !u.typed && num(u.speech_s) > 0)
    .map(({ u, i }) => ({ label: `T${i + 1}`, wpm: (wordCount(u.text) / u.speech_s) * 60, detail: shorten(u.text, 50) }));
}

function renderAnswerChart(s, kind, anchors) {
  const box = $("chart-answers");
  const scores = answerScores(s);
  if (kind === "teacher" && !scores.some((q) => q.score !== null)) {
    // Language sessions are not scored: corrections per thing said instead.
    $("chart-answers-title").textContent = "Corrections per turn";
    $("chart-answers-note").textContent = "How many corrections each thing you said got. Fewer is better.";
    box.dataset.metric = "corrections";
    const rows = anchors.users.map((u, i) => ({ label: `T${i + 1}`, text: u.text, count: anchors.bySeq.get(u.seq)?.corrections.length ?? 0 }));
    drawChart(box, (theme) => ({
      type: "bar",
      data: {
        labels: rows.map((r) => r.label),
        datasets: [{ label: "Corrections", data: rows.map((r) => r.count), backgroundColor: alpha(theme.warning, 0.75), borderRadius: 6, maxBarThickness: 36 }],
      },
      options: {
        scales: { y: { suggestedMax: 3, ticks: { precision: 0 } } },
        plugins: { tooltip: { callbacks: { title: (items) => shorten(rows[items[0].dataIndex]?.text, 80), label: (item) => `${item.raw} ${item.raw === 1 ? "correction" : "corrections"}` } } },
      },
    }));
    const total = rows.reduce((a, r) => a + r.count, 0);
    box.setAttribute("aria-label", rows.length
      ? `Corrections per turn over ${rows.length} turns: ${total} in all, at most ${Math.max(...rows.map((r) => r.count))} in one turn.`
      : "Corrections per turn: nothing was said.");
    chartEmpty("chart-answers", rows.length ? null : "Nothing was said in this session.");
    return;
  }
  box.dataset.metric = "score";
  drawChart(box, (theme) => ({
    type: "bar",
    data: {
      labels: scores.map((q) => q.label),
      datasets: [{
        label: "Score",
        data: scores.map((q) => q.score),
        backgroundColor: scores.map((q) => alpha(bandColor(theme, q.score), 0.8)),
        hoverBackgroundColor: scores.map((q) => bandColor(theme, q.score)),
        borderRadius: 6,
        maxBarThickness: 44,
      }],
    },
    options: {
      scales: { y: { min: 0, max: 10, ticks: { stepSize: 2 } } },
      plugins: {
        tooltip: {
          callbacks: {
            title: (items) => `${scores[items[0].dataIndex]?.label}: ${shorten(scores[items[0].dataIndex]?.question, 80)}`,
            label: (item) => (item.raw === null ? "Not scored" : `Score ${formatNumber(item.raw)} / 10`),
          },
        },
      },
    },
  }));
  const values = scores.map((q) => q.score);
  const scored = values.filter((v) => v !== null);
  box.setAttribute("aria-label", scored.length
    ? `Score per answer, out of 10: ${scores.map((q) => `${q.label} ${q.score === null ? "not scored" : formatNumber(q.score)}`).join(", ")}. ` +
      `Best ${formatNumber(Math.max(...scored))}, lowest ${formatNumber(Math.min(...scored))}.`
    : "Score per answer: no answer was scored.");
  chartEmpty("chart-answers", scored.length ? null : "No answer was scored in this session.");
}

function renderPaceChart(s, anchors) {
  const box = $("chart-answer-pace");
  const paces = answerPaces(s, anchors);
  drawChart(box, (theme) => ({
    type: "line",
    data: {
      labels: paces.map((p) => p.label),
      datasets: [{
        label: "Pace",
        data: paces.map((p) => p.wpm),
        borderColor: theme.accent,
        backgroundColor: theme.accent,
        pointBackgroundColor: paces.map((p) => (p.wpm !== null && p.wpm >= HEALTHY_WPM[0] && p.wpm <= HEALTHY_WPM[1] ? theme.ok : theme.warning)),
        pointBorderColor: theme.surface,
        pointBorderWidth: 2,
        pointRadius: 6,
        pointHoverRadius: 8,
        borderWidth: 2,
        cubicInterpolationMode: "monotone",
        spanGaps: true,
      }],
    },
    options: {
      scales: {
        x: { offset: true },
        y: { beginAtZero: false, suggestedMin: 90, suggestedMax: 190 },
      },
      plugins: {
        parleyBand: { from: HEALTHY_WPM[0], to: HEALTHY_WPM[1], color: alpha(theme.ok, 0.14), edge: alpha(theme.ok, 0.55) },
        tooltip: {
          callbacks: {
            label: (item) => (item.raw === null ? "No pace measured" : `${Math.round(item.raw)} wpm`),
            afterLabel: (item) => paces[item.dataIndex]?.detail ?? "",
          },
        },
      },
    },
  }));
  const values = paces.map((p) => p.wpm);
  box.setAttribute("aria-label", describeTrend({ what: "Speaking pace", values, unit: " wpm", over: "answers", better: "band", band: HEALTHY_WPM, digits: 0 }));
  chartEmpty("chart-answer-pace", values.some((v) => v !== null) ? null : "No spoken answer was measured (typed answers have no pace).");
}

// ---------------------------------------------------------------------------
// Transcript replay

function metaLine(items) {
  const present = items.filter(Boolean);
  if (!present.length) return null;
  return h("p", { class: "meta" }, present.flatMap((item, i) => (i ? [" · ", item] : [item])));
}

function replayRow(s, turn, anchors) {
  const who = turn.speaker === "user" ? "user" : "agent";
  const notes = anchors.bySeq.get(turn.seq);
  const offset = durationSeconds(s.started_at, turn.at);
  const time = offset !== null ? h("time", { class: "offset", datetime: isoDateTimeAttr(turn.at), title: formatDateTime(turn.at) }, formatOffset(offset)) : null;
  const qi = notes?.questionIndex ?? null;

  const entry = h("div", { class: `entry from-${who}${turn.interrupted ? " interrupted" : ""}` },
    srOnly(who === "user" ? "You: " : "Agent: "),
    h("p", { class: `line ${who}${turn.typed ? " typed" : ""}`, dir: "auto" }, text(turn.text)),
    metaLine([
      time,
      who === "user" && qi !== null && h("span", { class: "answer-to" }, `answer to Q${qi + 1}`),
      turn.typed && h("span", { class: "typed-tag" }, "typed"),
      who === "agent" && turn.interrupted && h("span", { class: "interrupted-tag", title: "You spoke over the agent; it stopped here." },
        "interrupted"),
      who === "agent" && metricsSpan(turn.metrics),
    ]),
    ...(notes?.deliveries ?? []).map((d) => deliveryLine(d)),
    ...(notes?.corrections ?? []).map((c) => h("p", { class: "correction inline" }, srOnly("Correction: "), correctionBody(c))));

  const cards = (notes?.feedback ?? []).map((f) => feedbackCard(f, { label: num(f.question_index) !== null ? `Q${f.question_index + 1}` : null, showAnswer: false }));
  return h("li", { class: `replay-row from-${who}${cards.length ? " has-feedback" : ""}`, dataset: { seq: text(turn.seq), speaker: who } },
    h("div", { class: "replay-turn" }, entry),
    cards.length ? h("aside", { class: "replay-aside", "aria-label": `Feedback on this answer${qi !== null ? ` (question ${qi + 1})` : ""}` }, cards) : null);
}

function renderReplay(s, anchors) {
  const transcript = Array.isArray(s.transcript) ? s.transcript : [];
  els.replayList.replaceChildren(...transcript.map((t) => replayRow(s, t, anchors)));
  // Without any feedback card there is no side column: the conversation takes the full width.
  els.replayList.classList.toggle("no-aside", !els.replayList.querySelector(".replay-aside"));
  els.replayEmpty.hidden = transcript.length > 0;
  els.replayList.hidden = transcript.length === 0;
  const interrupted = transcript.filter((t) => t.speaker === "agent" && t.interrupted).length;
  els.replayCount.textContent = transcript.length
    ? `${transcript.length} ${transcript.length === 1 ? "turn" : "turns"}${interrupted ? ` · agent interrupted ${interrupted}×` : ""}`
    : "";

  // What could not be placed next to an answer still gets shown.
  const extraCards = [
    ...anchors.extra.feedback.map((f) => feedbackCard(f, { label: num(f.question_index) !== null ? `Q${f.question_index + 1}` : null })),
  ];
  const extraCorrections = anchors.extra.corrections;
  const vocabulary = (s.evaluations ?? []).filter((e) => e?.kind === "vocabulary" && text(e.word));
  const resultHasVocabulary = Array.isArray(s.result?.vocabulary) && s.result.vocabulary.length > 0;
  const parts = [];
  if (extraCards.length) parts.push(...extraCards);
  if (extraCorrections.length) {
    parts.push(h("section", { class: "card-section" }, h("h4", { class: "section-title" }, "Other corrections"),
      h("ul", { class: "summary-corrections" }, extraCorrections.map((c) => h("li", {}, correctionBody(c))))));
  }
  // New words live in the summary; shown here only if there is no summary to hold them.
  if (vocabulary.length && !resultHasVocabulary && s.kind !== "teacher") {
    parts.push(h("section", { class: "card-section" }, h("h4", { class: "section-title" }, "New words"),
      h("dl", { class: "vocabulary-list" }, vocabulary.map(vocabularyItem))));
  }
  els.extraList.replaceChildren(...parts);
  els.extra.hidden = parts.length === 0;
}

// ---------------------------------------------------------------------------
// Export

async function exportAs(button) {
  const format = button.dataset.format;
  const ext = format === "markdown" ? "md" : "json";
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  els.exportStatus.textContent = "Preparing the download…";
  try {
    const name = await download(apiPath(`/export?format=${encodeURIComponent(format)}`), `parley-session-${SESSION_ID}.${ext}`);
    els.exportStatus.textContent = `Downloaded ${name}`;
  } catch (err) {
    els.exportStatus.textContent = `Export failed: ${err?.message || err}`;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------
// Loading

function showError(err) {
  els.errorText.textContent = err?.message || String(err);
  els.error.hidden = false;
}

async function load() {
  els.error.hidden = true;
  els.loading.hidden = false;
  delete document.body.dataset.ready;
  if (!SESSION_ID) {
    els.loading.hidden = true;
    els.notFound.hidden = false;
    els.notFoundText.textContent = "No session id in the address.";
    markReady();
    return;
  }
  let s;
  try {
    [s] = await Promise.all([api(apiPath()), loadCatalog()]);
  } catch (err) {
    els.loading.hidden = true;
    if (err instanceof ApiError && (err.status === 404 || err.status === 403)) {
      els.notFound.hidden = false;
      document.title = "Session not found · Parley";
    } else {
      showError(err);
    }
    markReady();
    return;
  }
  parleyReport.session = s;
  s.transcript = Array.isArray(s.transcript) ? s.transcript.slice().sort((a, b) => (num(a.seq) ?? 0) - (num(b.seq) ?? 0)) : [];
  s.evaluations = Array.isArray(s.evaluations) ? s.evaluations.filter((e) => e && typeof e === "object") : [];
  const kind = s.kind ?? personaKind(s.persona) ?? "interviewer";

  const anchors = anchorEvaluations(s.transcript, s.evaluations);
  parleyReport.anchors = anchors;

  els.loading.hidden = true;
  els.content.hidden = false; // before the charts, so their containers have a size
  renderHeader(s, kind);
  renderResult(s, kind);
  renderReplay(s, anchors);
  try {
    renderAnswerChart(s, kind, anchors);
    renderPaceChart(s, anchors);
  } catch (err) {
    showError(`Could not draw the charts: ${err?.message || err}`);
  }
  markReady();
}

function init() {
  for (const button of document.querySelectorAll("[data-format]")) {
    button.addEventListener("click", () => exportAs(button));
  }
  els.retry.addEventListener("click", () => load());
  load();
}

init();
