// Pieces the feedback studio's pages share: uploads, model and file pickers, small bar charts.

import { ApiError, api, getKey } from "./api.js";
import { h } from "./ui.js";

/** Upload a JSONL file (multipart, as OpenAI's client does) and return the file object. */
export async function upload(file, purpose = "fine-tune") {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("v1/files", { method: "POST", headers: { Authorization: `Bearer ${getKey()}` }, body: form });
  } catch {
    throw new ApiError(0, "Cannot reach the Tunery server. Is `tunery serve` still running?");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body?.error?.message || `Upload failed (${response.status}).`, body?.error?.code);
  return body;
}

/** The models a chat can use: base models and fine-tuned ones (never checkpoints: too many to list). */
export async function chatModels(signal) {
  const page = await api("v1/models", { signal });
  return page.data.map((m) => m.id).filter((id) => !id.includes(":ckpt-step-"));
}

export async function fineTuneFiles(signal) {
  const page = await api("v1/files?purpose=fine-tune&limit=200", { signal });
  return page.data;
}

export function select(id, options, { value = "", blank = null } = {}) {
  const el = h(
    "select",
    { id, name: id },
    blank !== null ? h("option", { value: "" }, blank) : null,
    options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)),
  );
  return el;
}

export function field(label, control, hint = null, wide = false) {
  return h("label", { class: wide ? "field wide" : "field", for: control.id }, h("span", {}, label, hint ? h("span", { class: "hint" }, ` ${hint}`) : null), control);
}

/** A horizontal bar per [label, value, max] row; `tone(value)` picks a fill class. */
export function bars(rows, { format = (v) => String(v), tone = () => "" } = {}) {
  return h(
    "div",
    { class: "bars" },
    rows.map(([label, value, max]) => {
      const fill = h("div", { class: `bar-fill ${tone(value)}` });
      fill.style.width = `${max ? Math.max(0, Math.min(1, (value || 0) / max)) * 100 : 0}%`;
      return h("div", { class: "bar-row" }, h("span", { title: label }, label), h("div", { class: "bar-track" }, fill), h("span", { class: "tabular small" }, value === null || value === undefined ? "–" : format(value)));
    }),
  );
}

export function pct(value, digits = 0) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(digits)}%`;
}

export function statTile(label, value, note = "", tone = "") {
  return h("div", { class: `stat-tile ${tone}` }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), note ? h("div", { class: "note" }, note) : null);
}

/** The prompt's turns: earlier ones small, the turn being answered larger (styles in studio.css). */
export function promptTurns(messages) {
  return messages.map((m) => h("p", { class: "turn" }, h("span", { class: "role" }, m.role), " ", h("span", { class: "content" }, m.content)));
}

export const RECOMMENDATIONS = { promote: "promote", review_safety: "wins: review its safety flags", keep_baseline: "keep the baseline", inconclusive: "too close to call", no_data: "no labels yet" };

/** A comparison's recommendation as a badge (or "current" once the candidate is the current model). */
export function verdictBadge(recommendation, current = false) {
  const kind = current ? "current" : recommendation;
  return h("span", { class: `badge badge-${kind}`, dataset: { verdict: kind } }, current ? "current model" : RECOMMENDATIONS[recommendation]);
}
